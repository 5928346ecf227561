//! `AgentService.Connect`, agent to server: one stream message as it
//! arrives, decoded and converted at the gRPC edge exactly as the server
//! does before anything reaches the domain (`convert::agent_message`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mdm_proto::v1 as pb;
use mdm_server::api::convert::{self, AgentMessage, MAX_REPORT_COMMAND_ID_LEN};
use prost::Message;

fn bounded(value: &str) -> bool {
    value.chars().count() <= 256 && !value.chars().any(char::is_control)
}

fuzz_target!(|data: &[u8]| {
    let Ok(message) = pb::ConnectRequest::decode(data) else {
        return;
    };
    match convert::agent_message(message) {
        Ok(AgentMessage::Hello { facts, compliance }) => {
            if let Some(facts) = facts {
                assert!(facts.capabilities.len() <= 32);
                for text in [
                    &facts.os_version,
                    &facts.model,
                    &facts.serial_number,
                    &facts.hostname,
                    &facts.agent_version,
                ] {
                    assert!(bounded(text), "unbounded fact {text:?}");
                }
                assert!(facts.capabilities.iter().all(|c| bounded(&c.reason)));
            }
            if let Some(compliance) = compliance {
                assert!(compliance.reason.chars().count() <= 256);
            }
        }
        Ok(AgentMessage::Compliance(compliance)) => {
            assert!(compliance.reason.chars().count() <= 256);
        }
        Ok(AgentMessage::Report { command_id, .. }) => {
            assert!(command_id.len() <= MAX_REPORT_COMMAND_ID_LEN);
        }
        Ok(AgentMessage::Heartbeat | AgentMessage::Ignored(_)) | Err(_) => {}
    }
});
