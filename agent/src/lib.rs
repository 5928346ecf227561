//! The MDM device agent as a library: enrollment, the command stream and the
//! platform backends live here; `main` only parses the command line.
#![forbid(unsafe_code)]
