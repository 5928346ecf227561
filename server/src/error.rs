//! The one mapping of domain errors to gRPC statuses. The errors themselves
//! are the domain's (`mdm_core::error`); the orphan rule keeps a `From` impl
//! out of reach, so the edge converts with [`status`] or [`OrStatus`].

use tonic::{Code, Status};

pub use mdm_core::error::{Error, Result};
use mdm_core::store::StoreError;

/// The gRPC status a caller sees for a domain error.
pub fn status(error: Error) -> Status {
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
        Error::Store(_) => {
            // Internal details go to the log, not to the caller.
            tracing::error!(%error, "internal error");
            return Status::internal("internal error; see the server log");
        }
    };
    Status::new(code, error.to_string())
}

/// `result.or_status()?` in an RPC: a domain result as a gRPC one.
pub trait OrStatus<T> {
    fn or_status(self) -> Result<T, Status>;
}

impl<T, E: Into<Error>> OrStatus<T> for Result<T, E> {
    fn or_status(self) -> Result<T, Status> {
        self.map_err(|error| status(error.into()))
    }
}

/// `error.into_status()`: for an edge that refuses with a domain error.
pub trait IntoStatus {
    fn into_status(self) -> Status;
}

impl IntoStatus for Error {
    fn into_status(self) -> Status {
        status(self)
    }
}
