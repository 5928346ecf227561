//! Domain errors: what a domain service refuses, in words a person can act
//! on. The edge maps each kind to its protocol's status (the gRPC mapping is
//! the server's `error` module).

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(StoreError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The one answer for an object id that names nothing the caller may see.
    pub fn no_such(kind: &str, id: &str) -> Self {
        Error::NotFound(format!("{kind} {id:?} does not exist"))
    }
}

impl From<StoreError> for Error {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::BadPageToken => Error::InvalidArgument(error.to_string()),
            other => Error::Store(other),
        }
    }
}
