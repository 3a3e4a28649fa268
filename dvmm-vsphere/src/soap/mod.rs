//! The SOAP layer, one concern per module: [`envelope`] writes requests,
//! [`reader`] reads answers into [`Node`] trees, [`fault`] decodes faults
//! into [`VsphereError`](dvmm_core::ports::VsphereError).

pub mod envelope;
pub mod fault;
pub mod reader;

pub use envelope::{Envelope, escape_into};
pub use fault::{Fault, decode_fault};
pub use reader::{
    MAX_DEPTH, Node, ReadError, Response, SOAP_ENV_NS, TypeName, VIM25_NS, XSI_NS, parse_document,
    read_response,
};
