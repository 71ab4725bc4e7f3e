//! Real NBD servers (nbdkit, qemu-nbd) as child processes, for tests and demos.
//!
//! Readiness without polling: the listening socket (TCP on 127.0.0.1 or a unix socket
//! in a private temporary directory) is bound here and handed to the server with
//! systemd socket activation (`LISTEN_FDS=1`, fd 3, `LISTEN_PID`), which both servers
//! support. A client can connect the moment [`ServerProcess`] is returned: the kernel
//! queues the connection until the server accepts it. The parent's copy of the socket
//! is closed after spawning, so once the server dies, connecting fails at once.
//!
//! Every server is killed (SIGKILL) and reaped when its [`ServerProcess`] is dropped;
//! its temporary directory (socket, stderr log) is removed.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A directory removed (with its content) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh directory under the system's temporary directory.
    pub fn new(prefix: &str) -> io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.subsec_nanos());
        loop {
            let attempt = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("{prefix}-{}-{attempt}-{nanos}", std::process::id());
            let path = std::env::temp_dir().join(name);
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir { path }),
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(error) => return Err(error),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// How the server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// TCP on 127.0.0.1, a free port.
    Tcp,
    /// A unix socket in the server's temporary directory.
    Unix,
}

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "{program} is not installed (not found on PATH); install the Debian package {package}"
    )]
    Missing {
        program: String,
        package: &'static str,
    },
    #[error("starting {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
}

/// A running NBD server; killed on drop.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    program: String,
    uri: String,
    dir: TempDir,
}

impl ServerProcess {
    /// Starts `nbdkit -f ARGS...` (ARGS: options, plugin, plugin arguments). nbdkit
    /// serves every export name, so the URI names the default export.
    pub fn nbdkit(args: &[&str], listen: Listen) -> Result<Self, ServerError> {
        let mut full = vec!["-f"];
        full.extend_from_slice(args);
        Self::start("nbdkit", "nbdkit", &full, listen, "")
    }

    /// Starts `qemu-nbd --persistent --shared=64 -x EXPORT ARGS...` (ARGS: options and
    /// the image file).
    pub fn qemu_nbd(args: &[&str], listen: Listen, export: &str) -> Result<Self, ServerError> {
        let mut full = vec!["--persistent", "--shared=64", "-x", export];
        full.extend_from_slice(args);
        Self::start("qemu-nbd", "qemu-utils", &full, listen, export)
    }

    /// Starts `program ARGS...` with a socket-activated listener.
    pub fn start(
        program: &str,
        package: &'static str,
        args: &[&str],
        listen: Listen,
        export: &str,
    ) -> Result<Self, ServerError> {
        if find_on_path(program).is_none() {
            return Err(ServerError::Missing {
                program: program.to_owned(),
                package,
            });
        }
        let spawn_error = |source| ServerError::Spawn {
            program: program.to_owned(),
            source,
        };
        let dir = TempDir::new("replcheck-server").map_err(spawn_error)?;
        let (listener, uri): (Box<dyn AsRawFd>, String) = match listen {
            Listen::Tcp => {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(spawn_error)?;
                let port = listener.local_addr().map_err(spawn_error)?.port();
                (
                    Box::new(listener),
                    format!("nbd://127.0.0.1:{port}/{export}"),
                )
            }
            Listen::Unix => {
                let path = dir.path().join("nbd.sock");
                let listener =
                    std::os::unix::net::UnixListener::bind(&path).map_err(spawn_error)?;
                (
                    Box::new(listener),
                    format!("nbd+unix:///{export}?socket={}", path.display()),
                )
            }
        };
        let stderr = File::create(dir.path().join("stderr.log")).map_err(spawn_error)?;
        let listener_fd = listener.as_raw_fd();
        let mut command = Command::new("sh");
        // The shell's pid is the server's after `exec`, which LISTEN_PID must name.
        command
            .arg("-c")
            .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
            .arg(program)
            .args(args)
            .env("LISTEN_FDS", "1")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (dup2, fcntl); it allocates nothing.
        unsafe {
            command.pre_exec(move || pass_as_fd_3(listener_fd));
        }
        let child = command.spawn().map_err(spawn_error)?;
        // The server holds its own copy now; dropping ours lets connections fail once
        // the server is gone.
        drop(listener);
        Ok(ServerProcess {
            child,
            program: program.to_owned(),
            uri,
            dir,
        })
    }

    /// The NBD URI of the server.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server wrote to stderr so far (for diagnostics).
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Kills the server with SIGKILL (a crash, no cleanup) and reaps it.
    pub fn kill(&mut self) -> io::Result<()> {
        if self.child.try_wait()?.is_none() {
            self.child.kill()?;
        }
        self.child.wait().map(drop)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Err(error) = self.kill() {
            eprintln!(
                "could not kill {} (pid {}): {error}",
                self.program,
                self.child.id()
            );
        }
    }
}

/// Makes `fd` the child's fd 3 without close-on-exec, as socket activation expects.
fn pass_as_fd_3(fd: RawFd) -> io::Result<()> {
    const ACTIVATION_FD: RawFd = 3;
    if fd == ACTIVATION_FD {
        // SAFETY: fcntl on an open descriptor with plain integer arguments.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        return Ok(());
    }
    // SAFETY: dup2 of an open descriptor; the new fd 3 does not inherit close-on-exec.
    if unsafe { libc::dup2(fd, ACTIVATION_FD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
