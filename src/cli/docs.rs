//! `completions` and `man`: the command line described for shells and for
//! `man`, generated from the same definitions as `--help` (clap_complete,
//! clap_mangen), so they never disagree with it.

use clap::{Args, CommandFactory};

use super::Cli;
use super::output::emit;

#[derive(Debug, Args)]
pub(super) struct CompletionsArgs {
    /// The shell to complete for, e.g. `choco-factory completions bash >
    /// /usr/share/bash-completion/completions/choco-factory`.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

pub(super) fn completions(args: &CompletionsArgs) -> anyhow::Result<()> {
    let mut command = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "choco-factory", &mut script);
    emit(&String::from_utf8_lossy(&script))
}

/// One page for the whole command line: every command with its flags.
pub(super) fn man() -> anyhow::Result<()> {
    let command = Cli::command();
    let mut page = Vec::new();
    let man = clap_mangen::Man::new(command.clone());
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    render_commands(&command, "", &mut page)?;
    man.render_extra_section(&mut page)?;
    man.render_version_section(&mut page)?;
    emit(&String::from_utf8_lossy(&page))
}

/// A COMMANDS section: each command (`dlq list`, ...) with what it does
/// and its own arguments, since clap_mangen's subcommand section lists
/// only their names.
fn render_commands(
    command: &clap::Command,
    parent: &str,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    if parent.is_empty() {
        out.extend_from_slice(b".SH COMMANDS\n");
    }
    for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("{parent}{}", sub.get_name());
        let about = sub.get_about().map(ToString::to_string).unwrap_or_default();
        out.extend_from_slice(format!(".SS \"{}\"\n", roff_escape(&name)).as_bytes());
        out.extend_from_slice(format!("{}\n", roff_escape(&about)).as_bytes());
        for arg in sub.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" || arg.is_global_set() {
                continue;
            }
            let flag = match (arg.get_long(), arg.get_value_names()) {
                (Some(long), Some(values)) if arg.get_action().takes_values() => {
                    format!("\\fB\\-\\-{long}\\fR \\fI<{}>\\fR", values.join(" "))
                }
                (Some(long), _) => format!("\\fB\\-\\-{long}\\fR"),
                (None, _) => format!("\\fI<{}>\\fR", id.to_uppercase()),
            };
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            out.extend_from_slice(format!(".TP\n{flag}\n{}\n", roff_escape(&help)).as_bytes());
        }
        render_commands(sub, &format!("{name} "), out)?;
    }
    Ok(())
}

/// Text as roff reads it literally: a leading `.` or `'` would be a request.
fn roff_escape(text: &str) -> String {
    text.lines()
        .map(|line| {
            let line = line.replace('\\', "\\e");
            if line.starts_with('.') || line.starts_with('\'') {
                format!("\\&{line}")
            } else {
                line
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}
