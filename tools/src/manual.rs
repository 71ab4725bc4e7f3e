//! Man pages and shell completions of the three binaries, generated from their clap
//! definitions (`replctl man`, `replctl completions`, `tools/install.sh`), so they
//! always describe the options the binaries really take.
//!
//! `replctl`'s own definition lives in its binary, which passes it in; `replicad`'s and
//! `replcheck`'s live in this library ([`crate::node::ReplicadArgs`],
//! [`crate::checker::cli::Cli`]).

use std::io;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

/// The binaries that have man pages and completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Program {
    Replctl,
    Replicad,
    Replcheck,
}

impl Program {
    pub const ALL: [Program; 3] = [Program::Replctl, Program::Replicad, Program::Replcheck];

    pub fn name(self) -> &'static str {
        match self {
            Program::Replctl => "replctl",
            Program::Replicad => "replicad",
            Program::Replcheck => "replcheck",
        }
    }

    /// The clap command of this program; `replctl` is the caller's (its binary owns it).
    pub fn command(self, replctl: &clap::Command) -> clap::Command {
        match self {
            Program::Replctl => replctl.clone(),
            Program::Replicad => crate::node::ReplicadArgs::command(),
            Program::Replcheck => crate::checker::cli::Cli::command(),
        }
    }
}

/// The completion script of `command` for `shell`. (Rendered into memory: clap_complete
/// panics on a failed write, e.g. into a closed pipe.)
pub fn completion_script(shell: clap_complete::Shell, command: clap::Command) -> Vec<u8> {
    let mut command = command;
    let name = command.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, name, &mut script);
    script
}

/// Writes the man pages of every program into `out_dir` (created if missing): one page
/// per program (`replctl.1`) and one per subcommand, nested ones included
/// (`replctl-status.1`). Returns the files written, in a stable order.
pub fn write_man_pages(out_dir: &Path, replctl: &clap::Command) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out_dir)?;
    let mut written = Vec::new();
    let date = page_date();
    for program in Program::ALL {
        let mut command = program.command(replctl).disable_help_subcommand(true);
        // Building names the subcommands `replctl-status` and so on.
        command.build();
        let page = Page {
            // Subcommand pages name the program and version they belong to.
            source: format!(
                "{} {}",
                command.get_name(),
                command.get_version().unwrap_or_default()
            ),
            date: date.clone(),
            out_dir,
        };
        page.write(&command, None, &mut written)?;
    }
    Ok(written)
}

/// What every page of one program shares.
struct Page<'a> {
    source: String,
    date: String,
    out_dir: &'a Path,
}

impl Page<'_> {
    /// Writes the page of `command`, then those of its visible subcommands.
    fn write(
        &self,
        command: &clap::Command,
        parent: Option<&str>,
        written: &mut Vec<PathBuf>,
    ) -> io::Result<()> {
        let name = command
            .get_display_name()
            .unwrap_or_else(|| command.get_name())
            .to_string();
        let man = clap_mangen::Man::new(command.clone())
            .date(&self.date)
            .source(&self.source)
            .manual("replicad");
        let mut page = Vec::new();
        man.render(&mut page)?;
        page.extend_from_slice(see_also(&name, parent, command).as_bytes());
        let path = self.out_dir.join(man.get_filename());
        std::fs::write(&path, page)?;
        written.push(path);
        for subcommand in command.get_subcommands().filter(|s| !s.is_hide_set()) {
            self.write(subcommand, Some(&name), written)?;
        }
        Ok(())
    }
}

/// The date on the pages, `YYYY-MM-DD`: `SOURCE_DATE_EPOCH` when set (reproducible
/// builds), else today. (An empty date would shift the other `.TH` fields.)
fn page_date() -> String {
    let seconds = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_secs())
        });
    let (year, month, day) = replicad::civil_date(seconds / 86_400);
    format!("{year:04}-{month:02}-{day:02}")
}

/// A SEE ALSO section: the parent page, the subcommand pages and the other programs.
fn see_also(name: &str, parent: Option<&str>, command: &clap::Command) -> String {
    let mut pages: Vec<String> = parent.map(str::to_string).into_iter().collect();
    pages.extend(
        command
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| {
                s.get_display_name()
                    .unwrap_or_else(|| s.get_name())
                    .to_string()
            }),
    );
    if parent.is_none() {
        pages.extend(
            Program::ALL
                .iter()
                .map(|program| program.name().to_string())
                .filter(|program| program != name),
        );
    }
    let references: Vec<String> = pages
        .iter()
        // Names are letters, digits and dashes; a dash is escaped in roff.
        .map(|page| format!("\\fB{}\\fR(1)", page.replace('-', "\\-")))
        .collect();
    format!(".SH \"SEE ALSO\"\n{}\n", references.join(",\n"))
}
