//! Domain errors, and their one mapping to gRPC statuses.

use tonic::{Code, Status};

use crate::admins::RegistryError;
use mdm_core::store::StoreError;

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
    #[error(transparent)]
    Registry(#[from] RegistryError),
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

impl From<mdm_store_sled::StorageError> for Error {
    fn from(error: mdm_store_sled::StorageError) -> Self {
        StoreError::from(error).into()
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = match &error {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Store(StoreError::DiskFull) => {
                tracing::error!(%error, "the data dir's disk is full");
                return Status::unavailable(
                    "the server's disk is full, so it cannot write its database and this call did not complete; \
                     free space on the data dir's file system, then restart the server",
                );
            }
            Error::Store(StoreError::Unavailable(reason)) => {
                tracing::error!(reason, "the database is unavailable");
                return Status::unavailable(
                    "the server cannot reach its database, so this call did not complete; retry shortly",
                );
            }
            Error::Store(_) | Error::Registry(_) => {
                // Internal details go to the log, not to the caller.
                tracing::error!(%error, "internal error");
                return Status::internal("internal error; see the server log");
            }
        };
        Status::new(code, error.to_string())
    }
}
