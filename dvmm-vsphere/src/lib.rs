//! vSphere adapters for dvmm (placeholder until the simulator and SOAP client land).
