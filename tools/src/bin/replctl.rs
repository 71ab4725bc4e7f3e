//! `replctl` — the admin CLI of replicad: a thin client of the daemon's control socket,
//! plus the commands that work on a store directly (`create-md`, `dump-md`), the
//! self-contained `demo` and `bench`, and `daemon` (the node daemon itself, so that
//! `replctl` alone can start the nodes of a demo).
//!
//! Exit codes: 0 done, 1 refused or failed (one-line reason on stderr), 2 usage error.

/// mimalloc: measurably cheaper than glibc malloc for the many small, short-lived
/// allocations of the request path (see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser, Subcommand};
use replicad::config::{self, Config};
use replicad::control::{Client, Request, ResourceStatus};
use tools::manual::Program;

#[derive(Debug, Parser)]
#[command(name = "replctl", version, about = "Administer replicad resources (DRBD-style).", long_about = None)]
struct Cli {
    /// Config file (the same on every node).
    #[arg(long, global = true, default_value = config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// This node's name in the config (default: the hostname).
    #[arg(long, global = true)]
    node: Option<String>,
    /// Talk to this control socket directly instead of the one the config names.
    #[arg(long, global = true)]
    control: Option<PathBuf>,
    /// Seconds to wait for the daemon's answer.
    #[arg(long, global = true, default_value_t = 120)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write fresh metadata on this node's backing store (the daemon must not hold it).
    CreateMd {
        /// The resource, as named in the config.
        resource: String,
        /// Overwrite existing metadata.
        #[arg(long)]
        force: bool,
        /// The store is known to be all zeroes: skip reading it to compute checksums.
        #[arg(long)]
        zeroed: bool,
    },
    /// Show the metadata on this node's backing store (works without the daemon).
    DumpMd {
        /// The resource, as named in the config.
        resource: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show role, disk, connection and sync progress (DRBD-like tree).
    Status {
        /// The resource, as named in the config (default: all of this node).
        resource: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make this node Primary (P4: refused while the peer is Primary).
    Promote {
        /// The resource, as named in the config.
        resource: String,
        /// Promote although the disk is not UpToDate or the peer is unreachable
        /// (you assert the other node is gone).
        #[arg(long)]
        force: bool,
    },
    /// Make this node Secondary (flushes first).
    Demote {
        /// The resource, as named in the config.
        resource: String,
    },
    /// (Re)connect to the peer.
    Connect {
        /// The resource, as named in the config.
        resource: String,
        /// Resolve a split brain by throwing this node's changes away.
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Disconnect from the peer and stay StandAlone.
    Disconnect {
        /// The resource, as named in the config.
        resource: String,
    },
    /// Open the backing store (after create-md or a replaced disk).
    Attach {
        /// The resource, as named in the config.
        resource: String,
    },
    /// Close the backing store (the node goes Diskless).
    Detach {
        /// The resource, as named in the config.
        resource: String,
    },
    /// Pause a running resync.
    PauseSync {
        /// The resource, as named in the config.
        resource: String,
    },
    /// Resume a paused resync.
    ResumeSync {
        /// The resource, as named in the config.
        resource: String,
    },
    /// Compare both replicas block by block.
    Verify {
        /// The resource, as named in the config.
        resource: String,
        /// Resync the blocks found different.
        #[arg(long)]
        repair: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Throw local data away and pull everything from the peer.
    Invalidate {
        /// The resource, as named in the config.
        resource: String,
    },
    /// Connected fresh stores known to be identical: skip the initial sync.
    NewCurrentUuid {
        /// The resource, as named in the config.
        resource: String,
        /// Required: both fresh stores become UpToDate without a resync.
        #[arg(long)]
        clear_bitmap: bool,
    },
    /// Wait until the resource is connected and in sync, with a progress bar.
    WaitSync {
        /// The resource, as named in the config.
        resource: String,
        /// Give up after this many seconds (0: wait forever).
        #[arg(long, default_value_t = 0)]
        wait: u64,
    },
    /// Point-in-time snapshots: create, list, delete (served read-only over NBD as
    /// RESOURCE@NAME).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Print state changes as they happen, one line each.
    Events,
    /// Stop this node's daemon gracefully.
    Shutdown,
    /// Mirror, fail, promote, verify: the whole story on temp image files.
    Demo(tools::demo::DemoArgs),
    /// Benchmark replicated writes on loopback devices (or image files).
    Bench(tools::bench::BenchArgs),
    /// Run a throwaway node or pair on image files in the foreground (for external
    /// benchmarks such as fio); stops cleanly on SIGTERM.
    Serve(tools::serve::ServeArgs),
    /// Run this node's daemon in the foreground: the same daemon as `replicad`.
    Daemon(tools::node::DaemonArgs),
    /// Write a backup file of an NBD export (a snapshot): full, or incremental with the
    /// changed ranges given.
    BackupFile(tools::backup::cli::BackupFileArgs),
    /// Back up a resource from this node: take a snapshot (or use --snapshot), read it
    /// over NBD, and write a full backup or, with --since, only the blocks changed
    /// since an earlier snapshot. Restore with `replctl restore`.
    Backup(tools::backup::cli::BackupArgs),
    /// Read a backup file to its end, check every CRC, and show what it holds.
    BackupVerify(tools::backup::cli::BackupVerifyArgs),
    /// Restore a chain of backup files (full, then incrementals) to an NBD export or an
    /// image file; everything is checked before the first write.
    Restore(tools::backup::cli::RestoreArgs),
    /// Print the shell completion script of replctl (or of replicad, replcheck).
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
        /// The program to complete.
        #[arg(long, value_enum, default_value_t = Program::Replctl)]
        program: Program,
    },
    /// Write the man pages of replctl (one per subcommand too), replicad and replcheck.
    Man {
        /// Where to write them (created if missing).
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("replctl: {}", tools::admin::error_line(&error));
            ExitCode::from(1)
        }
    }
}

fn node_name(cli: &Cli, config: Option<&Config>) -> String {
    cli.node.clone().unwrap_or_else(|| {
        let host = config::hostname();
        // On a machine that runs one node of the config, that node is meant.
        match config {
            Some(config)
                if !config.node_names().contains(&host) && config.node_names().len() == 1 =>
            {
                config.node_names()[0].clone()
            }
            _ => host,
        }
    })
}

fn client(cli: &Cli) -> anyhow::Result<Client> {
    let path = match &cli.control {
        Some(path) => path.clone(),
        None => {
            let config = Config::load(&cli.config)?;
            let node = node_name(cli, Some(&config));
            config.control_socket(&node)?
        }
    };
    Ok(Client::connect(&path, Duration::from_secs(cli.timeout))?)
}

fn print_result(value: serde_json::Value) {
    match value {
        serde_json::Value::String(text) => println!("{text}"),
        serde_json::Value::Null => {}
        other => println!("{other}"),
    }
}

fn simple(cli: &Cli, request: Request) -> anyhow::Result<()> {
    print_result(client(cli)?.call(&request)?);
    Ok(())
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Take a snapshot of this node's store: every write completed before it is in
    /// it, none after. Needs `snapshot-dir` in the node's config.
    Create {
        resource: String,
        name: String,
        /// On the Primary: at the same point of the write order on every connected
        /// node (each answers; the command fails if one could not take it).
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// List the snapshots, their size and the snapshot area's use.
    List {
        resource: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot (refused while an NBD client reads it).
    Delete {
        resource: String,
        name: String,
        #[arg(long)]
        json: bool,
    },
}

fn snapshot(cli: &Cli, command: &SnapshotCommand) -> anyhow::Result<()> {
    let (request, json) = match command {
        SnapshotCommand::Create {
            resource,
            name,
            all,
            json,
        } => (
            Request::SnapshotCreate {
                resource: resource.clone(),
                name: name.clone(),
                all: *all,
            },
            *json,
        ),
        SnapshotCommand::List { resource, json } => (
            Request::SnapshotList {
                resource: resource.clone(),
            },
            *json,
        ),
        SnapshotCommand::Delete {
            resource,
            name,
            json,
        } => (
            Request::SnapshotDelete {
                resource: resource.clone(),
                name: name.clone(),
            },
            *json,
        ),
    };
    let value = client(cli)?.call(&request)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    print!(
        "{}",
        tools::admin::render_snapshots(command_verb(command), &value)
    );
    Ok(())
}

fn command_verb(command: &SnapshotCommand) -> &'static str {
    match command {
        SnapshotCommand::Create { .. } => "created",
        SnapshotCommand::List { .. } => "list",
        SnapshotCommand::Delete { .. } => "deleted",
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::CreateMd {
            resource,
            force,
            zeroed,
        } => tools::admin::create_md(
            &cli.config,
            &node_name(&cli, Config::load(&cli.config).ok().as_ref()),
            resource,
            *force,
            *zeroed,
        ),
        Command::DumpMd { resource, json } => tools::admin::dump_md(
            &cli.config,
            &node_name(&cli, Config::load(&cli.config).ok().as_ref()),
            resource,
            *json,
        ),
        Command::Snapshot(command) => snapshot(&cli, command),
        Command::Status { resource, json } => {
            let statuses = client(&cli)?.status(resource.as_deref())?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&statuses)?);
            } else {
                for status in &statuses {
                    print!("{}", tools::admin::render_status(status));
                }
            }
            Ok(())
        }
        Command::Promote { resource, force } => simple(
            &cli,
            Request::Promote {
                resource: resource.clone(),
                force: *force,
            },
        ),
        Command::Demote { resource } => simple(
            &cli,
            Request::Demote {
                resource: resource.clone(),
            },
        ),
        Command::Connect {
            resource,
            discard_my_data,
        } => simple(
            &cli,
            Request::Connect {
                resource: resource.clone(),
                discard_my_data: *discard_my_data,
            },
        ),
        Command::Disconnect { resource } => simple(
            &cli,
            Request::Disconnect {
                resource: resource.clone(),
            },
        ),
        Command::Attach { resource } => simple(
            &cli,
            Request::Attach {
                resource: resource.clone(),
            },
        ),
        Command::Detach { resource } => simple(
            &cli,
            Request::Detach {
                resource: resource.clone(),
            },
        ),
        Command::PauseSync { resource } => simple(
            &cli,
            Request::PauseSync {
                resource: resource.clone(),
            },
        ),
        Command::ResumeSync { resource } => simple(
            &cli,
            Request::ResumeSync {
                resource: resource.clone(),
            },
        ),
        Command::Invalidate { resource } => simple(
            &cli,
            Request::Invalidate {
                resource: resource.clone(),
            },
        ),
        Command::NewCurrentUuid {
            resource,
            clear_bitmap,
        } => simple(
            &cli,
            Request::NewCurrentUuid {
                resource: resource.clone(),
                clear_bitmap: *clear_bitmap,
            },
        ),
        Command::Shutdown => simple(&cli, Request::Shutdown),
        Command::Verify {
            resource,
            repair,
            json,
        } => {
            let value = client(&cli)?.call(&Request::Verify {
                resource: resource.clone(),
                repair: *repair,
            })?;
            if *json {
                println!("{value}");
            } else {
                let blocks = value["out_of_sync_blocks"].as_u64().unwrap_or(0);
                println!(
                    "{resource}: verify found {blocks} out-of-sync blocks ({} bytes){}",
                    blocks * 4096,
                    if *repair && blocks > 0 {
                        "; resyncing them"
                    } else {
                        ""
                    }
                );
            }
            Ok(())
        }
        Command::WaitSync { resource, wait } => wait_sync(&cli, resource, *wait),
        Command::Events => {
            let mut client = client(&cli)?;
            client.subscribe()?;
            loop {
                match client.next_event() {
                    Ok(Some(line)) => println!("{line}"),
                    Ok(None) => return Ok(()),
                    Err(replicad::control::ClientError::Io(error))
                        if matches!(
                            error.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        continue
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        }
        Command::Demo(args) => tools::demo::run(args),
        Command::Bench(args) => tools::bench::run(args),
        Command::Serve(args) => tools::serve::run(args),
        Command::Daemon(args) => tools::node::run(&cli.config, cli.node.as_deref(), args),
        Command::BackupFile(args) => tools::backup::cli::backup_file(args),
        Command::Backup(args) => tools::backup::cli::backup_resource(args, &mut client(&cli)?),
        Command::BackupVerify(args) => tools::backup::cli::backup_verify(args),
        Command::Restore(args) => tools::backup::cli::restore(args),
        Command::Completions { shell, program } => {
            let script = tools::manual::completion_script(*shell, program.command(&Cli::command()));
            let mut out = std::io::stdout().lock();
            out.write_all(&script)?;
            out.flush()?;
            Ok(())
        }
        Command::Man { out_dir } => {
            for path in tools::manual::write_man_pages(out_dir, &Cli::command())? {
                println!("{}", path.display());
            }
            Ok(())
        }
    }
}

fn in_sync(status: &ResourceStatus) -> bool {
    status.disk == "UpToDate"
        && status.peer.as_ref().is_none_or(|peer| {
            peer.connection == "Connected"
                && peer.replication == "Established"
                && peer.peer_disk.as_deref() == Some("UpToDate")
        })
}

fn wait_sync(cli: &Cli, resource: &str, wait: u64) -> anyhow::Result<()> {
    let deadline = (wait > 0).then(|| Instant::now() + Duration::from_secs(wait));
    let mut client = client(cli)?;
    let bar = indicatif::ProgressBar::new(10_000);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:40}] {msg}")
            .map_err(|e| anyhow::anyhow!(e.to_string()))?
            .progress_chars("=> "),
    );
    bar.set_prefix(resource.to_string());
    loop {
        let status = client
            .status(Some(resource))?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no status for {resource}"))?;
        if in_sync(&status) {
            bar.set_position(10_000);
            bar.finish_with_message("in sync");
            return Ok(());
        }
        let peer = status.peer.clone().unwrap_or_default();
        let done = peer.done_percent.unwrap_or(0.0);
        bar.set_position((done * 100.0) as u64);
        let eta = peer
            .eta_seconds
            .map(|s| format!(" eta:{s}s"))
            .unwrap_or_default();
        bar.set_message(format!(
            "disk:{} {} {} done:{done:.2}{eta}",
            status.disk, peer.connection, peer.replication
        ));
        if deadline.is_some_and(|d| Instant::now() >= d) {
            bar.abandon();
            anyhow::bail!(
                "{resource} not in sync after {wait}s (disk:{} connection:{} replication:{})",
                status.disk,
                peer.connection,
                peer.replication
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
