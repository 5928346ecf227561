//! Writes the committed seed corpora under `fuzz/corpus/<target>/seed-*`:
//! small, valid inputs for every target, so the fuzzer starts deep in the
//! code instead of at "not a protobuf". Run once after changing a proto or
//! an input format:
//!
//! ```text
//! CARGO_TARGET_DIR=target/fuzz-seeds cargo run --manifest-path fuzz/Cargo.toml --example make_seeds
//! ```
//!
//! CSRs are made with fresh keys, so the bytes differ on every run.

use std::path::{Path, PathBuf};

use mdm_proto::v1 as pb;
use prost::Message;

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    dir
}

fn write(target: &str, name: &str, bytes: impl AsRef<[u8]>) {
    let path = corpus(target).join(format!("seed-{name}"));
    std::fs::write(&path, bytes).expect("seed written");
    println!("{}", path.display());
}

fn csr(algorithm: &'static rcgen::SignatureAlgorithm, common_name: &str) -> String {
    let key = rcgen::KeyPair::generate_for(algorithm).expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    if !common_name.is_empty() {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
    }
    params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
}

fn facts() -> pb::DeviceFacts {
    pb::DeviceFacts {
        platform: pb::Platform::Linux.into(),
        os_version: "Debian 12".into(),
        model: "ThinkPad X1".into(),
        serial_number: "PF-123456".into(),
        hostname: "laptop-7".into(),
        agent_version: "0.1.0".into(),
        capabilities: vec![
            pb::DeviceCapability {
                action: pb::ActionType::ResetPasscode.into(),
                supported: true,
                reason: String::new(),
            },
            pb::DeviceCapability {
                action: pb::ActionType::Lock.into(),
                supported: false,
                reason: "agent is not running as root".into(),
            },
        ],
    }
}

fn enroll_request() {
    let request = |csr_pem: String, device: Option<pb::DeviceFacts>| {
        pb::EnrollRequest {
            user_email: "alice@example.com".into(),
            company_passcode: "ABCD-EFGH-JKLM".into(),
            csr_pem,
            device,
        }
        .encode_to_vec()
    };
    let p256 = csr(&rcgen::PKCS_ECDSA_P256_SHA256, "");
    write(
        "enroll_request",
        "p256",
        request(p256.clone(), Some(facts())),
    );
    write(
        "enroll_request",
        "ed25519",
        request(csr(&rcgen::PKCS_ED25519, "dv_fuzzfuzzfuzz"), Some(facts())),
    );
    write(
        "enroll_request",
        "p384-wrong-key",
        request(csr(&rcgen::PKCS_ECDSA_P384_SHA384, ""), Some(facts())),
    );
    write(
        "enroll_request",
        "other-subject-no-device",
        request(csr(&rcgen::PKCS_ECDSA_P256_SHA256, "dv_someoneelse"), None),
    );
    // The raw path: the bytes are the PEM text itself.
    write("enroll_request", "raw-pem", p256);
}

fn agent_message() {
    use pb::connect_request::Message as M;
    let messages = [
        (
            "hello",
            M::Hello(pb::AgentHello {
                facts: Some(facts()),
                compliance: Some(pb::PasscodeCompliance {
                    has_passcode: true,
                    meets_policy: false,
                    reason: "passcode shorter than 8".into(),
                }),
            }),
        ),
        (
            "ack",
            M::Ack(pb::CommandAck {
                command_id: "ac_0193a1b2c3d4e5f6".into(),
            }),
        ),
        (
            "progress",
            M::Progress(pb::CommandProgress {
                command_id: "ac_0193a1b2c3d4e5f6".into(),
                step: "passcode set".into(),
            }),
        ),
        (
            "result-ok",
            M::Result(pb::CommandResult {
                command_id: "ac_0193a1b2c3d4e5f6".into(),
                succeeded: true,
                failure_code: pb::FailureCode::Unspecified.into(),
                message: String::new(),
            }),
        ),
        (
            "result-failed",
            M::Result(pb::CommandResult {
                command_id: "ac_0193a1b2c3d4e5f6".into(),
                succeeded: false,
                failure_code: pb::FailureCode::Permission.into(),
                message: "chpasswd: permission denied".into(),
            }),
        ),
        (
            "heartbeat",
            M::Heartbeat(pb::Heartbeat {
                sent_at: Some(prost_types::Timestamp {
                    seconds: 1_796_000_000,
                    nanos: 500_000_000,
                }),
            }),
        ),
        (
            "compliance",
            M::Compliance(pb::PasscodeCompliance {
                has_passcode: true,
                meets_policy: true,
                reason: String::new(),
            }),
        ),
    ];
    for (name, message) in messages {
        let bytes = pb::ConnectRequest {
            message: Some(message),
        }
        .encode_to_vec();
        write("agent_message", name, bytes);
    }
    write(
        "agent_message",
        "empty",
        pb::ConnectRequest::default().encode_to_vec(),
    );
}

fn users_csv() {
    write(
        "users_csv",
        "valid.csv",
        "email,display_name\nalice@example.com,Alice\nBob@Example.COM,Bob Builder\n\"carol@example.com\",\"Carol, Jr.\"\n",
    );
    write(
        "users_csv",
        "errors.csv",
        "\u{feff}Email,Display_Name\r\nnot-an-email,Bob\r\n\r\ndave@example.com,Dave,extra\r\nalice@example.com,Alice\r\nALICE@example.com,Again\r\n\"unterminated@example.com,Oops\n",
    );
    write(
        "users_csv",
        "email-only.csv",
        "display_name,email\n,eve@example.org\n  frank@example.org  \n",
    );
}

fn config() {
    write(
        "config",
        "full.toml",
        r#"data_dir = "/var/lib/mdm"
listen = "0.0.0.0:7443"
san = ["mdm.example.com", "10.0.0.5"]
log_format = "json"
owner_email = "Owner@Example.com"
device_cert_lifetime = "7d"
heartbeat_interval = "30s"

[smtp]
host = "smtp.example.com"
port = 587
tls = "starttls"
from = "MDM <mdm@example.com>"
"#,
    );
    write(
        "config",
        "local-relay.toml",
        "listen = \"[::1]:7443\"\nheartbeat_interval = \"15m\"\n\n[smtp]\nhost = \"localhost\"\ntls = \"none\"\nfrom = \"mdm@localhost\"\n",
    );
    write("config", "minimal.toml", "device_cert_lifetime = \"12h\"\n");
    // Inputs that overflowed before durations were capped at 3650d (see
    // `config::tests::absurd_durations_in_a_config_file_are_refused`).
    write(
        "config",
        "regress-lifetime.toml",
        "device_cert_lifetime = \"3000000d\"\n",
    );
    write(
        "config",
        "regress-heartbeat.toml",
        "heartbeat_interval = \"999999999999999d\"\n",
    );
    write("config", "duration", "90");
    write("config", "email", "owner@example.com");
}

fn main() {
    enroll_request();
    agent_message();
    users_csv();
    config();
}
