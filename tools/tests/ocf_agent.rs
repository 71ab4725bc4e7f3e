//! The OCF resource agent `tools/ocf/replicad` (ocf:replicad:replicad) against a real
//! pair on loopback: `ocf-tester` (package resource-agents) drives it for node alpha
//! while beta runs as a plain daemon; then the agent's own rules, run as Pacemaker
//! would run it: promotion scores (through stand-ins for Pacemaker's tools), no
//! promotion while the peer is Primary, a forced promotion once the peer is gone.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const OCF_SUCCESS: i32 = 0;
const OCF_ERR_GENERIC: i32 = 1;
const OCF_ERR_UNIMPLEMENTED: i32 = 3;
const OCF_ERR_INSTALLED: i32 = 5;
const OCF_ERR_CONFIGURED: i32 = 6;
const OCF_NOT_RUNNING: i32 = 7;
const OCF_RUNNING_MASTER: i32 = 8;

/// A pair whose stores are in sync, beta running as a plain daemon and alpha stopped:
/// the node the agent will manage.
fn pair_for_the_agent(test: &str) -> Cluster {
    let mut cluster = Cluster::pair(test, ClusterOptions::default());
    cluster.replctl_ok("alpha", &["demote", RESOURCE]);
    cluster.stop("alpha");
    cluster
}

/// The agent, copied where the user `nobody` can run it (ocf-tester checks that), with
/// the environment Pacemaker would give it for node alpha of `cluster`.
struct Agent {
    dir: PathBuf,
    path: PathBuf,
    config: PathBuf,
    log: PathBuf,
    rsctmp: PathBuf,
    /// Stand-ins for Pacemaker's crm_attribute and crm_master, if any.
    crm: Option<PathBuf>,
}

impl Agent {
    fn new(cluster: &Cluster) -> Agent {
        require_tool("ocf-tester", "resource-agents");
        require_tool("xmllint", "libxml2-utils");
        assert!(
            Path::new("/usr/lib/ocf/lib/heartbeat/ocf-shellfuncs").is_file(),
            "ocf-shellfuncs missing (Debian package resource-agents)"
        );
        let dir = std::env::temp_dir().join(format!(
            "replicad-ocf-{}-{}",
            std::process::id(),
            cluster.dir.file_name().unwrap().to_string_lossy()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("agent dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let path = dir.join("replicad");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("ocf/replicad");
        std::fs::copy(&source, &path).expect("copy the agent");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Agent {
            dir,
            path,
            config: cluster.config.clone(),
            log: cluster.dir.join("alpha-agent.log"),
            rsctmp: cluster.dir.join("rsctmp"),
            crm: None,
        }
    }

    /// Puts recording stand-ins for crm_attribute and crm_master first on PATH.
    fn with_pacemaker_tools(mut self) -> Agent {
        let bin = self.dir.join("crm");
        std::fs::create_dir_all(&bin).expect("crm dir");
        for tool in ["crm_attribute", "crm_master"] {
            let script = bin.join(tool);
            std::fs::write(
                &script,
                format!(
                    "#!/bin/sh\necho \"{tool} $*\" >>'{}'\n",
                    self.scores_file().display()
                ),
            )
            .expect("write stand-in");
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        self.crm = Some(bin);
        self
    }

    fn scores_file(&self) -> PathBuf {
        self.dir.join("scores")
    }

    /// The score calls the agent made so far, one line each.
    fn scores(&self) -> Vec<String> {
        std::fs::read_to_string(self.scores_file())
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The OCF parameters, as `-o name=value` for ocf-tester or OCF_RESKEY_ variables.
    fn parameters(&self) -> Vec<(&'static str, String)> {
        vec![
            ("config", self.config.display().to_string()),
            ("resource", RESOURCE.to_string()),
            ("node", "alpha".to_string()),
            ("replctl", REPLCTL.to_string()),
            ("log", self.log.display().to_string()),
            ("connect_wait", "2".to_string()),
        ]
    }

    /// Runs `action` with `overrides` of the parameters (an empty value unsets one).
    fn run_with(&self, action: &str, overrides: &[(&str, &str)]) -> Output {
        let mut command = Command::new(&self.path);
        command
            .arg(action)
            .env("OCF_ROOT", "/usr/lib/ocf")
            .env("OCF_RA_VERSION_MAJOR", "1")
            .env("OCF_RA_VERSION_MINOR", "1")
            .env("OCF_RESOURCE_INSTANCE", "replicad-test")
            .env("OCF_RESKEY_CRM_meta_timeout", "30000")
            .env("OCF_RESKEY_CRM_meta_interval", "10000")
            .env("HA_RSCTMP", &self.rsctmp);
        for (name, value) in self.parameters() {
            command.env(format!("OCF_RESKEY_{name}"), value);
        }
        for (name, value) in overrides {
            if value.is_empty() {
                command.env_remove(format!("OCF_RESKEY_{name}"));
            } else {
                command.env(format!("OCF_RESKEY_{name}"), value);
            }
        }
        if let Some(bin) = &self.crm {
            let path = std::env::var("PATH").unwrap_or_default();
            command
                .env("PATH", format!("{}:{path}", bin.display()))
                .env("HA_SBIN_DIR", bin)
                .env("OCF_RESKEY_crm_feature_set", "3.16.2")
                .env("OCF_RESKEY_CRM_meta_clone", "0");
        }
        run_with_timeout(&mut command, Duration::from_secs(120))
    }

    /// Runs `action`; its OCF exit code, which must be `expected`.
    fn expect(&self, action: &str, expected: i32) {
        self.expect_with(action, &[], expected);
    }

    fn expect_with(&self, action: &str, overrides: &[(&str, &str)], expected: i32) {
        let output = self.run_with(action, overrides);
        assert_eq!(
            output.status.code(),
            Some(expected),
            "agent {action} {overrides:?}: stdout {}\nstderr {}\n--- daemon log ---\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// The daemon the agent started, if it still runs: from the agent's pid file.
    fn daemon_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.rsctmp.join("replicad-r0.pid")).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat.rsplit(") ").next()?.chars().next()?;
        (state != 'Z').then_some(pid)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A failed test may leave the daemon the agent started (not our child): end it.
        if let Some(pid) = self.daemon_pid() {
            // SAFETY: kill with the pid the agent recorded for the daemon it started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn ocf_tester_passes_against_a_running_pair() {
    let mut cluster = pair_for_the_agent("ocf-tester");
    let agent = Agent::new(&cluster);
    let mut command = Command::new("ocf-tester");
    command.arg("-n").arg("replicad-test");
    for (name, value) in agent.parameters() {
        command.arg("-o").arg(format!("{name}={value}"));
    }
    command.arg(&agent.path).env("HA_RSCTMP", &agent.rsctmp);
    let output = run_with_timeout(&mut command, Duration::from_secs(300));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("passed all tests"),
        "ocf-tester failed ({}):\n{stdout}\n{}\n--- daemon log ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        std::fs::read_to_string(&agent.log).unwrap_or_default()
    );
    // ocf-tester ends with a stop: alpha's daemon is gone, beta still serves.
    assert_eq!(agent.daemon_pid(), None, "alpha's daemon outlived the stop");
    agent.expect("monitor", OCF_NOT_RUNNING);
    assert!(cluster.is_running("beta"), "{}", cluster.log_tail("beta"));
    assert_eq!(cluster.status("beta").disk, "UpToDate");
}

#[test]
fn agent_scores_promotes_and_fails_over_as_pacemaker_expects() {
    let mut cluster = pair_for_the_agent("ocf-rules");
    let agent = Agent::new(&cluster).with_pacemaker_tools();

    // Parameters that cannot work are refused before anything starts.
    agent.expect_with(
        "validate-all",
        &[("config", "/nonexistent.toml")],
        OCF_ERR_INSTALLED,
    );
    agent.expect_with(
        "validate-all",
        &[("replctl", "/nonexistent/replctl")],
        OCF_ERR_INSTALLED,
    );
    agent.expect_with("validate-all", &[("resource", "")], OCF_ERR_CONFIGURED);
    agent.expect_with("validate-all", &[("resource", "r9")], OCF_ERR_CONFIGURED);
    agent.expect_with(
        "validate-all",
        &[("connect_wait", "soon")],
        OCF_ERR_CONFIGURED,
    );
    agent.expect("validate-all", OCF_SUCCESS);
    agent.expect("migrate_to", OCF_ERR_UNIMPLEMENTED);
    agent.expect("monitor", OCF_NOT_RUNNING);
    assert!(agent.scores().is_empty(), "a probe sets no score");

    // Started: Secondary (OCF_SUCCESS), UpToDate: the high promotion score.
    agent.expect("start", OCF_SUCCESS);
    agent.expect("monitor", OCF_SUCCESS);
    assert_eq!(
        agent.scores().last().map(String::as_str),
        Some("crm_attribute -p -v 10000"),
        "{:?}",
        agent.scores()
    );
    // The peer is Primary: no promotion, not even a forced one. (Beta is promoted
    // while alpha's daemon is down, so alpha learns its role when they connect.)
    agent.expect("stop", OCF_SUCCESS);
    cluster.replctl_ok("beta", &["promote", RESOURCE, "--force"]);
    agent.expect("start", OCF_SUCCESS);
    cluster.wait_status(
        "alpha",
        "connected to beta, a Primary",
        Duration::from_secs(30),
        |s| {
            s.peer.as_ref().is_some_and(|p| {
                p.connection == "Connected" && p.role.as_deref() == Some("Primary")
            })
        },
    );
    agent.expect("promote", OCF_ERR_GENERIC);
    agent.expect("monitor", OCF_SUCCESS);
    cluster.replctl_ok("beta", &["demote", RESOURCE]);
    cluster.wait_status(
        "alpha",
        "in sync with beta, a Secondary",
        Duration::from_secs(60),
        |s| {
            s.disk == "UpToDate"
                && s.peer.as_ref().is_some_and(|p| {
                    p.replication == "Established"
                        && p.role.as_deref() == Some("Secondary")
                        && p.peer_disk.as_deref() == Some("UpToDate")
                })
        },
    );

    // Promote and demote with the peer connected.
    agent.expect("promote", OCF_SUCCESS);
    agent.expect("monitor", OCF_RUNNING_MASTER);
    assert_eq!(cluster.status("alpha").role, "Primary");
    agent.expect("demote", OCF_SUCCESS);
    agent.expect("monitor", OCF_SUCCESS);
    assert_eq!(cluster.status("alpha").role, "Secondary");

    // Failover: beta is gone (Pacemaker would have fenced it); alpha is UpToDate and
    // is promoted with --force once connect_wait has passed.
    cluster.stop("beta");
    cluster.wait_status("alpha", "without its peer", Duration::from_secs(30), |s| {
        s.peer.as_ref().is_some_and(|p| p.connection != "Connected")
    });
    agent.expect("promote", OCF_SUCCESS);
    agent.expect("monitor", OCF_RUNNING_MASTER);
    assert_eq!(cluster.status("alpha").role, "Primary");
    assert_eq!(
        agent.scores().last().map(String::as_str),
        Some("crm_attribute -p -v 10000")
    );

    // Stop demotes, ends the daemon and withdraws the score.
    agent.expect("stop", OCF_SUCCESS);
    assert_eq!(agent.daemon_pid(), None, "alpha's daemon outlived the stop");
    agent.expect("monitor", OCF_NOT_RUNNING);
    agent.expect("stop", OCF_SUCCESS);
    assert_eq!(
        agent.scores().last().map(String::as_str),
        Some("crm_attribute -p -D")
    );
    // replctl shutdown was a clean stop: the store opens without a journal replay.
    cluster.start("alpha");
    let status = cluster.status("alpha");
    assert_eq!(status.recovery.as_deref(), Some("clean"), "{status:?}");
    assert_eq!(status.disk, "UpToDate");
}
