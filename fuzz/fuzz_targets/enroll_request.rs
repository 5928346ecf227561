//! `EnrollmentService.Enroll` input: the protobuf request as it arrives, the
//! edge checks on its device facts, and its CSR through the same parser and
//! verifier the server uses. A CSR that passes must be certifiable by the CA.
//! Raw bytes are also fed to the CSR parser as PEM text.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mdm_proto::v1 as pb;
use mdm_server::api::convert;
use mdm_server::pki::{self, CertificateAuthority};
use prost::Message;

const DEVICE_ID: &str = "dv_fuzzfuzzfuzz";

fn ca() -> &'static CertificateAuthority {
    static CA: OnceLock<CertificateAuthority> = OnceLock::new();
    CA.get_or_init(|| {
        CertificateAuthority::generate("mdm fuzz CA")
            .expect("a CA can be generated")
            .0
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = pb::EnrollRequest::decode(data) {
        if let Some(facts) = request.device {
            let _ = convert::device_facts(facts);
        }
        let _ = mdm_core::domain::users::normalize_email(&request.user_email);
        for device_id in [None, Some(DEVICE_ID)] {
            if let Ok(csr) = pki::parse_device_csr(&request.csr_pem, device_id) {
                ca().issue_device_cert(&csr, DEVICE_ID, time::Duration::days(7))
                    .expect("a verified CSR can be certified");
            }
        }
    }
    let _ = pki::parse_device_csr(&String::from_utf8_lossy(data), Some(DEVICE_ID));
});
