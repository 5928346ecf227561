//! Which commands this agent has seen and what became of them, kept in the
//! state dir so a command is applied at most once across restarts and a
//! result that could not be sent is sent after reconnecting.

use std::collections::VecDeque;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Commands remembered; older finished ones are forgotten first.
const CAPACITY: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Stored and acknowledged; not started.
    Received,
    /// Being applied. Found on restart, it means the agent stopped midway.
    Applying,
    /// Finished; the result is sent again whenever the server asks.
    Done(Outcome),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub succeeded: bool,
    /// `mdm.v1.FailureCode` value.
    pub failure_code: i32,
    pub message: String,
    /// Steps completed, in order.
    pub steps: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    command_id: String,
    stage: Stage,
}

#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    entries: VecDeque<Entry>,
}

impl Journal {
    pub fn open(state_dir: &std::path::Path) -> std::io::Result<Self> {
        let path = state_dir.join("journal.json");
        let entries = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => VecDeque::new(),
            Err(e) => return Err(e),
        };
        Ok(Self { path, entries })
    }

    pub fn stage(&self, command_id: &str) -> Option<Stage> {
        self.entries
            .iter()
            .find(|e| e.command_id == command_id)
            .map(|e| e.stage.clone())
    }

    /// Records a stage durably before the caller acts on it.
    pub fn record(&mut self, command_id: &str, stage: Stage) -> std::io::Result<()> {
        match self.entries.iter_mut().find(|e| e.command_id == command_id) {
            Some(entry) => entry.stage = stage,
            None => self.entries.push_back(Entry {
                command_id: command_id.to_owned(),
                stage,
            }),
        }
        while self.entries.len() > CAPACITY {
            match self
                .entries
                .iter()
                .position(|e| matches!(e.stage, Stage::Done(_)))
            {
                Some(oldest_done) => {
                    self.entries.remove(oldest_done);
                }
                None => break,
            }
        }
        let json = serde_json::to_vec(&self.entries)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        crate::state::write_atomic(&self.path, &json, true)
    }
}
