//! vSphere adapters for dvmm: the in-process simulator ([`sim`]) and the vim25
//! SOAP client.

pub mod sim;
