//! `cliper`: the command line's edge. The commands live in `cli/`, the
//! work in the library.

use std::process::ExitCode;

use clap::Parser;

mod cli;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "cliper",
    version,
    about = "Live, interpretable facial-expression recognition with CLIPER"
)]
#[command(args_conflicts_with_subcommands = true, allow_negative_numbers = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<cli::Command>,
    /// With no command: `cliper live` with these options.
    #[command(flatten)]
    live: cli::live::LiveArgs,
}

/// The command line, each command taking negative numbers as values
/// (`--x -0.5`) rather than as flags.
fn parse() -> Result<Cli, clap::Error> {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command()
        .mut_subcommands(|c| c.allow_negative_numbers(true))
        .try_get_matches()?;
    Cli::from_arg_matches(&matches)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(command) => command.run(),
        None => cli.live.run(),
    }
}

/// Turns transparent huge pages off for this process. With them, the
/// kernel's khugepaged slowly folds the allocator's partly used 2 MiB
/// regions into whole huge pages, so a long `run` or `live` session's
/// resident memory crept up by about 10% an hour with a flat heap
/// (heaptrack); without them it stays flat (README, "Soak").
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and only sets a flag
    // on this process's memory map; a failure (old kernel) changes nothing.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// The library reports through `log`; this prints it on stderr as plain
/// lines, warnings and errors prefixed as the rest of the CLI's messages
/// are. `RUST_LOG` chooses what shows (default: cliper's own notes and
/// above; the window toolkit's chatter stays out).
fn init_logging() {
    use std::io::Write;
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("cliper=info"))
        .format(|buf, record| {
            let prefix = match record.level() {
                log::Level::Error => "error: ",
                log::Level::Warn => "warning: ",
                _ => "",
            };
            writeln!(buf, "{prefix}{}", record.args())
        })
        .init();
}

fn main() -> ExitCode {
    no_transparent_huge_pages();
    init_logging();
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line, not clap's multi-line usage block; but keep what
            // the first paragraph lists (the missing arguments' names).
            let msg = e.render().to_string();
            let first: Vec<&str> = msg
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let first = match first.join(" ") {
                s if s.is_empty() => "invalid arguments".to_string(),
                s => s,
            };
            eprintln!("{first} (see `cliper --help`)");
            return ExitCode::from(2);
        }
    };
    // The model's thread pool, before anything starts rayon's default one
    // (`bench --threads` sizes its own).
    if !matches!(cli.command, Some(cli::Command::Bench(_))) {
        let _ = cliper::parallel::build_model_pool(None);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Candle appends a backtrace when RUST_BACKTRACE is set: keep
            // the message to its first line.
            let msg = format!("{e:#}");
            if std::env::var_os("CLIPER_DEBUG").is_some() {
                eprintln!("{e:?}");
            }
            eprintln!("error: {}", msg.lines().next().unwrap_or("unknown error"));
            ExitCode::FAILURE
        }
    }
}
