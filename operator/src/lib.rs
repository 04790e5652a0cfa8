//! Palisade's operator. Controllers read Palisade objects, call pure translators
//! (spec → desired objects), apply the result and write status.

pub mod names;
pub mod translate;
