//! Man pages and shell completions, generated from the binaries' clap definitions:
//! `replctl man` writes a page for every program and every subcommand, each renders
//! with groff and man without a warning, and the completion scripts parse in bash and
//! zsh and really complete in bash.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{require_tool, run_ok, run_with_timeout, temp_dir, REPLCTL};

const TIMEOUT: Duration = Duration::from_secs(60);
const PROGRAMS: [&str; 3] = ["replctl", "replicad", "replcheck"];

/// The subcommands `PROGRAM --help` lists (without `help`): what the binary really takes.
fn subcommands(program: &str) -> Vec<String> {
    nested_subcommands(program, &[])
}

/// The subcommands of `program PATH...` (as its `--help` lists them).
fn nested_subcommands(program: &str, path: &[&str]) -> Vec<String> {
    let help = run_ok(
        Command::new(binary(program)).args(path).arg("--help"),
        TIMEOUT,
    );
    let Some((_, commands)) = help.split_once("Commands:\n") else {
        return Vec::new();
    };
    commands
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .filter(|line| line.starts_with("  ") && !line.starts_with("   "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

fn binary(program: &str) -> &'static str {
    match program {
        "replctl" => REPLCTL,
        "replicad" => common::REPLICAD,
        "replcheck" => common::REPLCHECK,
        other => panic!("no program {other}"),
    }
}

/// `replctl completions SHELL --program PROGRAM` into a file.
fn completion_script(dir: &Path, shell: &str, program: &str) -> PathBuf {
    let script = run_ok(
        Command::new(REPLCTL).args(["completions", shell, "--program", program]),
        TIMEOUT,
    );
    let path = dir.join(format!("{program}.{shell}"));
    std::fs::write(&path, script).expect("write the script");
    path
}

#[test]
fn bash_completions_parse_and_complete_subcommands_and_options() {
    require_tool("bash", "bash");
    let dir = temp_dir("manual-bash");
    for program in PROGRAMS {
        let script = completion_script(&dir, "bash", program);
        run_ok(Command::new("bash").arg("-n").arg(&script), TIMEOUT);
        // Load it as bash-completion would and complete `PROGRAM <TAB>` and
        // `PROGRAM --<TAB>`: the function gets the command, the word and the one before.
        let complete = |word: &str| -> Vec<String> {
            let line = format!(
                "source \"$1\" && complete -p {program} >/dev/null || exit 3; \
                 COMP_WORDS=({program} \"$2\"); COMP_CWORD=1; \
                 COMP_LINE=\"{program} $2\"; COMP_POINT=${{#COMP_LINE}}; \
                 _{program} {program} \"$2\" {program}; printf '%s\\n' \"${{COMPREPLY[@]}}\""
            );
            run_ok(
                Command::new("bash")
                    .arg("-c")
                    .arg(line)
                    .arg("bash")
                    .arg(&script)
                    .arg(word),
                TIMEOUT,
            )
            .lines()
            .map(str::to_string)
            .collect()
        };
        let words = complete("");
        for subcommand in subcommands(program) {
            assert!(
                words.contains(&subcommand),
                "{program} <TAB> does not offer {subcommand}: {words:?}"
            );
        }
        let options = complete("--");
        assert!(
            options.contains(&"--help".to_string()) && options.contains(&"--version".to_string()),
            "{program} --<TAB>: {options:?}"
        );
        if program != "replcheck" {
            assert!(options.contains(&"--config".to_string()), "{options:?}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn zsh_and_fish_completions_parse_and_name_every_subcommand() {
    require_tool("zsh", "zsh");
    let dir = temp_dir("manual-zsh-fish");
    for program in PROGRAMS {
        let zsh = completion_script(&dir, "zsh", program);
        run_ok(Command::new("zsh").arg("-n").arg(&zsh), TIMEOUT);
        let zsh_text = std::fs::read_to_string(&zsh).expect("read");
        assert!(
            zsh_text.starts_with(&format!("#compdef {program}\n")),
            "{program}: zsh script without #compdef"
        );
        // fish itself is not installed here: its script must register every
        // subcommand for the program.
        let fish = std::fs::read_to_string(completion_script(&dir, "fish", program))
            .expect("read the fish script");
        assert!(fish.contains(&format!("complete -c {program} ")));
        for subcommand in subcommands(program) {
            assert!(
                zsh_text.contains(&format!("'{subcommand}:")),
                "zsh script of {program} lacks {subcommand}"
            );
            assert!(
                fish.contains(&format!("-a \"{subcommand}\"")),
                "fish script of {program} lacks {subcommand}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn man_pages_exist_for_every_program_and_subcommand_and_render_cleanly() {
    require_tool("groff", "groff-base");
    require_tool("man", "man-db");
    let dir = temp_dir("manual-man");
    let man1 = dir.join("man1");
    let listed = run_ok(
        Command::new(REPLCTL).arg("man").arg("--out-dir").arg(&man1),
        TIMEOUT,
    );
    let mut expected: Vec<String> = Vec::new();
    for program in PROGRAMS {
        expected.push(format!("{program}.1"));
        for subcommand in subcommands(program) {
            expected.push(format!("{program}-{subcommand}.1"));
            // One page per nested subcommand too (`replctl snapshot create`).
            expected.extend(
                nested_subcommands(program, &[&subcommand])
                    .iter()
                    .map(|nested| format!("{program}-{subcommand}-{nested}.1")),
            );
        }
    }
    assert!(expected.len() > 25, "too few pages expected: {expected:?}");
    let mut written: Vec<String> = std::fs::read_dir(&man1)
        .expect("read the man directory")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    written.sort();
    expected.sort();
    assert_eq!(
        written, expected,
        "pages written against subcommands listed"
    );
    assert_eq!(
        listed.lines().count(),
        expected.len(),
        "replctl man lists what it wrote"
    );

    let version = env!("CARGO_PKG_VERSION");
    for page in &expected {
        let path = man1.join(page);
        let roff = std::fs::read_to_string(&path).expect("read page");
        let name = page.trim_end_matches(".1");
        let program = name.split('-').next().expect("program");
        // The title line: name, section, a date, program and version, the manual.
        let title = roff
            .lines()
            .find(|line| line.starts_with(".TH "))
            .unwrap_or_else(|| panic!("{page} has no .TH line"));
        assert!(
            title.starts_with(&format!(".TH {name} 1 20"))
                && title.ends_with(&format!("\"{program} {version}\" replicad")),
            "{page}: {title}"
        );
        for section in [
            ".SH NAME",
            ".SH SYNOPSIS",
            ".SH DESCRIPTION",
            ".SH \"SEE ALSO\"",
        ] {
            assert!(roff.contains(section), "{page} lacks {section}");
        }
        // groff with all warnings on must have nothing to say.
        let groff = run_with_timeout(
            Command::new("groff")
                .args(["-man", "-Tutf8", "-ww"])
                .arg(&path),
            TIMEOUT,
        );
        assert!(
            groff.status.success() && groff.stderr.is_empty(),
            "groff on {page}: {}",
            String::from_utf8_lossy(&groff.stderr)
        );
        // man finds the page by name through MANPATH and renders it.
        let rendered = run_ok(
            Command::new("man")
                .env("MANPATH", &dir)
                .env("MANWIDTH", "100")
                .args(["-P", "cat", name]),
            TIMEOUT,
        );
        assert!(
            rendered.contains("NAME") && rendered.contains("SYNOPSIS"),
            "man {name}:\n{rendered}"
        );
    }

    // replicad's page is its real command line, shared with `replctl daemon`.
    let replicad = run_ok(
        Command::new("man")
            .env("MANPATH", &dir)
            .env("MANWIDTH", "100")
            .args(["-P", "cat", "replicad"]),
        TIMEOUT,
    );
    for option in ["--config", "--node", "--log", "--threads"] {
        assert!(
            replicad.contains(option),
            "replicad(1) lacks {option}:\n{replicad}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
