//! The real operating system as a backend. Every OS call goes through a
//! [`CommandRunner`], so the exact invocations of each platform are unit
//! tested on Linux. Passcodes travel on stdin, never in argv.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use mdm_proto::v1 as pb;

use crate::backend::{Backend, Failure, Task, capability};

/// Runs a program with arguments and optional stdin.
pub trait CommandRunner: Send + Sync + std::fmt::Debug {
    fn run(&self, program: &str, args: &[&str], stdin: Option<&[u8]>) -> std::io::Result<Output>;
    /// Whether `program` can be found.
    fn exists(&self, program: &str) -> bool;
}

#[derive(Debug, Default)]
pub struct ProcessRunner;

impl CommandRunner for ProcessRunner {
    fn run(&self, program: &str, args: &[&str], stdin: Option<&[u8]>) -> std::io::Result<Output> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input)?;
        }
        child.wait_with_output()
    }

    fn exists(&self, program: &str) -> bool {
        if program.contains('/') {
            return std::path::Path::new(program).exists();
        }
        std::env::var_os("PATH").is_some_and(|paths| {
            std::env::split_paths(&paths).any(|dir| dir.join(program).is_file())
        })
    }
}

/// One OS call: program, arguments, and what goes to stdin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub program: &'static str,
    pub args: Vec<String>,
    pub stdin: Option<String>,
}

/// The operating system families we know how to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Os {
    Linux,
    MacOs,
    Windows,
}

impl Os {
    pub fn current() -> Self {
        if cfg!(target_os = "macos") {
            Os::MacOs
        } else if cfg!(target_os = "windows") {
            Os::Windows
        } else {
            Os::Linux
        }
    }
}

/// A local account name we are willing to put into a command: no shell
/// or script metacharacters.
pub fn valid_account(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// How `os` sets `account`'s password to `passcode`.
///
/// - Linux: `chpasswd` reads `user:password` lines on stdin.
/// - macOS: `dscl .` in interactive mode reads `passwd /Users/<user> <password>` on stdin.
/// - Windows: PowerShell reads the password from stdin into a SecureString for `Set-LocalUser`.
pub fn set_password(os: Os, account: &str, passcode: &str) -> Invocation {
    match os {
        Os::Linux => Invocation {
            program: "chpasswd",
            args: vec![],
            stdin: Some(format!("{account}:{passcode}\n")),
        },
        Os::MacOs => Invocation {
            program: "dscl",
            args: vec![".".into()],
            stdin: Some(format!("passwd /Users/{account} {passcode}\n")),
        },
        Os::Windows => Invocation {
            program: "powershell.exe",
            args: vec![
                "-NoProfile".into(),
                "-NonInteractive".into(),
                "-Command".into(),
                format!(
                    "$p = [Console]::In.ReadLine() | ConvertTo-SecureString -AsPlainText -Force; Set-LocalUser -Name '{account}' -Password $p"
                ),
            ],
            stdin: Some(format!("{passcode}\n")),
        },
    }
}

/// How `os` locks every session.
pub fn lock_sessions(os: Os) -> Invocation {
    match os {
        Os::Linux => Invocation {
            program: "loginctl",
            args: vec!["lock-sessions".into()],
            stdin: None,
        },
        Os::MacOs => Invocation {
            program: "/System/Library/CoreServices/Menu Extras/User.menu/Contents/Resources/CGSession",
            args: vec!["-suspend".into()],
            stdin: None,
        },
        Os::Windows => Invocation {
            program: "rundll32.exe",
            args: vec!["user32.dll,LockWorkStation".into()],
            stdin: None,
        },
    }
}

#[derive(Debug)]
pub struct SystemBackend {
    os: Os,
    runner: Box<dyn CommandRunner>,
    /// The local account whose password a reset sets.
    managed_account: Option<String>,
}

impl SystemBackend {
    pub fn new(managed_account: Option<String>) -> Self {
        Self::with_runner(Os::current(), Box::new(ProcessRunner), managed_account)
    }

    pub fn with_runner(
        os: Os,
        runner: Box<dyn CommandRunner>,
        managed_account: Option<String>,
    ) -> Self {
        Self {
            os,
            runner,
            managed_account,
        }
    }

    fn privileged(&self) -> bool {
        match self.os {
            Os::Linux | Os::MacOs => crate::state::is_root(),
            // Windows needs an elevated service account; the service runs as LocalSystem.
            Os::Windows => true,
        }
    }

    /// Why this device cannot set the managed account's password, if it cannot.
    fn reset_blocker(&self) -> Option<String> {
        let Some(account) = &self.managed_account else {
            return Some("no managed account: run the agent with --managed-user NAME".into());
        };
        if !valid_account(account) {
            return Some(format!(
                "the managed account name {account:?} is not a valid account name"
            ));
        }
        if !self.privileged() {
            return Some("the agent is not running as root (administrator)".into());
        }
        let program = set_password(self.os, account, "").program;
        if !self.runner.exists(program) {
            return Some(format!("{program} is not installed"));
        }
        if self.os == Os::Linux
            && !std::fs::read_to_string("/etc/passwd")
                .is_ok_and(|text| text.lines().any(|l| l.split(':').next() == Some(account)))
        {
            return Some(format!("the managed account {account} does not exist"));
        }
        None
    }

    fn lock_blocker(&self) -> Option<String> {
        let program = lock_sessions(self.os).program;
        if !self.runner.exists(program) {
            return Some(format!("no session manager: {program} is not installed"));
        }
        // sd_booted(): logind only works when systemd is the init system.
        if self.os == Os::Linux && !std::path::Path::new("/run/systemd/system").is_dir() {
            return Some("no session manager: the system was not booted with systemd".into());
        }
        None
    }

    fn call(&self, invocation: &Invocation) -> Result<(), Failure> {
        let output = self
            .runner
            .run(
                invocation.program,
                &invocation
                    .args
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
                invocation.stdin.as_deref().map(str::as_bytes),
            )
            .map_err(|e| Failure {
                code: pb::FailureCode::Internal,
                message: format!("cannot run {}: {e}", invocation.program),
            })?;
        if output.status.success() {
            return Ok(());
        }
        // The program's own words, minus anything that could echo input back.
        let stderr = String::from_utf8_lossy(&output.stderr);
        let first = stderr
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect::<String>();
        let code = if first.to_ascii_lowercase().contains("permission")
            || first.to_ascii_lowercase().contains("denied")
        {
            pb::FailureCode::Permission
        } else {
            pb::FailureCode::Internal
        };
        Err(Failure {
            code,
            message: format!("{} failed ({}): {first}", invocation.program, output.status),
        })
    }

    fn lock(&self, step: &mut dyn FnMut(&str), required: bool) -> Result<(), Failure> {
        match self.lock_blocker() {
            None => match self.call(&lock_sessions(self.os)) {
                Ok(()) => {
                    step("device locked");
                    Ok(())
                }
                Err(failure) if required => Err(failure),
                Err(failure) => {
                    step(&format!("sessions not locked: {}", failure.message));
                    Ok(())
                }
            },
            Some(reason) if required => Err(Failure {
                code: pb::FailureCode::Unsupported,
                message: reason,
            }),
            Some(reason) => {
                step(&format!("sessions not locked: {reason}"));
                Ok(())
            }
        }
    }
}

impl Backend for SystemBackend {
    fn name(&self) -> &'static str {
        "system"
    }

    fn capabilities(&self) -> Vec<pb::DeviceCapability> {
        let reset = self.reset_blocker();
        let lock = self.lock_blocker();
        vec![
            capability(pb::ActionType::Unenroll, true, ""),
            capability(
                pb::ActionType::Lock,
                lock.is_none(),
                lock.as_deref().unwrap_or(""),
            ),
            capability(
                pb::ActionType::ResetPasscode,
                reset.is_none(),
                reset.as_deref().unwrap_or(""),
            ),
        ]
    }

    fn apply(
        &self,
        _command_id: &str,
        task: &Task,
        step: &mut dyn FnMut(&str),
    ) -> Result<(), Failure> {
        match task {
            Task::Lock { .. } => self.lock(step, true),
            Task::ResetPasscode { passcode, .. } => {
                if let Some(reason) = self.reset_blocker() {
                    return Err(Failure {
                        code: pb::FailureCode::Unsupported,
                        message: reason,
                    });
                }
                let account = self.managed_account.as_deref().unwrap_or_default();
                self.call(&set_password(self.os, account, passcode))?;
                step("passcode set");
                // The new password is what protects the device; locking is
                // best effort on machines without a session manager.
                self.lock(step, false)
            }
        }
    }

    fn compliance(&self, _policy: &pb::PasscodePolicy) -> Option<pb::PasscodeCompliance> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// (program, args, stdin) of one call.
    type Call = (String, Vec<String>, Option<String>);

    #[derive(Debug, Default)]
    struct Recorder {
        calls: Mutex<Vec<Call>>,
    }

    impl CommandRunner for std::sync::Arc<Recorder> {
        fn run(
            &self,
            program: &str,
            args: &[&str],
            stdin: Option<&[u8]>,
        ) -> std::io::Result<Output> {
            self.calls.lock().expect("lock").push((
                program.to_owned(),
                args.iter().map(|a| (*a).to_owned()).collect(),
                stdin.map(|s| String::from_utf8_lossy(s).into_owned()),
            ));
            Command::new("true").output()
        }
        fn exists(&self, _program: &str) -> bool {
            true
        }
    }

    #[test]
    fn passcodes_go_on_stdin_never_in_argv() {
        for os in [Os::Linux, Os::MacOs, Os::Windows] {
            let invocation = set_password(os, "alice", "83920174");
            assert!(
                invocation.args.iter().all(|a| !a.contains("83920174")),
                "{os:?}: {invocation:?}"
            );
            assert!(
                invocation
                    .stdin
                    .as_deref()
                    .is_some_and(|s| s.contains("83920174")),
                "{os:?}"
            );
        }
        assert_eq!(
            set_password(Os::Linux, "alice", "1234").stdin.as_deref(),
            Some("alice:1234\n")
        );
        assert_eq!(set_password(Os::MacOs, "alice", "1234").args, vec!["."]);
        assert_eq!(
            set_password(Os::MacOs, "alice", "1234").stdin.as_deref(),
            Some("passwd /Users/alice 1234\n")
        );
        let windows = set_password(Os::Windows, "alice", "1234");
        assert_eq!(windows.program, "powershell.exe");
        assert!(windows.args[3].contains("Set-LocalUser -Name 'alice'"));
    }

    #[test]
    fn each_platform_locks_with_its_standard_mechanism() {
        assert_eq!(lock_sessions(Os::Linux).program, "loginctl");
        assert_eq!(lock_sessions(Os::Linux).args, vec!["lock-sessions"]);
        assert!(lock_sessions(Os::MacOs).program.ends_with("CGSession"));
        assert_eq!(
            lock_sessions(Os::Windows).args,
            vec!["user32.dll,LockWorkStation"]
        );
    }

    #[test]
    fn account_names_that_could_inject_are_refused() {
        assert!(valid_account("alice"));
        assert!(valid_account("svc.kiosk-1"));
        for bad in [
            "",
            "-rf",
            "a b",
            "a'b",
            "a;b",
            "a$(x)",
            "x".repeat(33).as_str(),
        ] {
            assert!(!valid_account(bad), "{bad}");
        }
    }

    #[test]
    fn a_windows_reset_runs_powershell_with_the_passcode_on_stdin_then_locks() {
        let recorder = std::sync::Arc::new(Recorder::default());
        let backend = SystemBackend::with_runner(
            Os::Windows,
            Box::new(recorder.clone()),
            Some("kiosk".into()),
        );
        let mut steps = Vec::new();
        backend
            .apply(
                "c1",
                &Task::ResetPasscode {
                    passcode: zeroize::Zeroizing::new("55512345".into()),
                    message: String::new(),
                },
                &mut |s| steps.push(s.to_owned()),
            )
            .expect("applied");
        assert_eq!(steps, vec!["passcode set", "device locked"]);
        let calls = recorder.calls.lock().expect("lock");
        assert_eq!(calls[0].0, "powershell.exe");
        assert_eq!(calls[0].2.as_deref(), Some("55512345\n"));
        assert_eq!(calls[1].0, "rundll32.exe");
    }
}
