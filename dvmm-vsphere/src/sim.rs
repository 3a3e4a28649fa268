//! In-process vCenter simulator (being written).
