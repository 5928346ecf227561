//! The `mdm.v1` API contract, generated from `proto/mdm/v1/*.proto`.
//!
//! Only the gRPC edge of the server and the agent use these types; domain
//! code converts them at the boundary.

pub mod v1 {
    #![allow(clippy::all, missing_debug_implementations)]
    tonic::include_proto!("mdm.v1");
}

/// Encoded `FileDescriptorSet` of every `mdm.v1` file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("mdm_descriptor");

/// `Debug` for the messages that carry a passcode: every field but the secret.
mod redacted {
    use super::v1;
    use std::fmt;

    const HIDDEN: &str = "<redacted>";

    impl fmt::Debug for v1::EnrollRequest {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("EnrollRequest")
                .field("user_email", &self.user_email)
                .field("company_passcode", &HIDDEN)
                .field("csr_pem", &self.csr_pem)
                .field("device", &self.device)
                .finish()
        }
    }

    impl fmt::Debug for v1::GenerateCompanyPasscodeResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("GenerateCompanyPasscodeResponse")
                .field("passcode", &HIDDEN)
                .field("info", &self.info)
                .finish()
        }
    }

    impl fmt::Debug for v1::ResetPasscodeResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("ResetPasscodeResponse")
                .field("action", &self.action)
                .field("passcode", &HIDDEN)
                .finish()
        }
    }

    impl fmt::Debug for v1::ResetPasscodeCommand {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("ResetPasscodeCommand")
                .field("passcode", &HIDDEN)
                .field("message", &self.message)
                .finish()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::v1;

        #[test]
        fn debug_output_never_shows_a_passcode() {
            let shown = [
                format!(
                    "{:?}",
                    v1::EnrollRequest {
                        company_passcode: "Secret123abc".into(),
                        ..Default::default()
                    }
                ),
                format!(
                    "{:?}",
                    v1::GenerateCompanyPasscodeResponse {
                        passcode: "Secret123abc".into(),
                        info: None
                    }
                ),
                format!(
                    "{:?}",
                    v1::ResetPasscodeResponse {
                        passcode: "Secret123abc".into(),
                        action: None
                    }
                ),
                format!(
                    "{:?}",
                    v1::ResetPasscodeCommand {
                        passcode: "Secret123abc".into(),
                        message: "m".into()
                    }
                ),
            ];
            for text in shown {
                assert!(!text.contains("Secret123abc"), "{text}");
                assert!(text.contains("<redacted>"), "{text}");
            }
        }
    }
}
