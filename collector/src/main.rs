//! The `collector` binary: argument parsing only; the work is in the library.

use std::fs::File;
use std::io::{self, BufWriter};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use collector::decode::{DecodeFailure, decode_to};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Per-node metrics agent for Mesos / DC/OS: Avro over TCP in, Kafka out.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decode OCF files or streams (for example `kcat -C -t TOPIC -e -f '%s'`
    /// output) and print one JSON object per MetricList, one per line.
    Decode {
        /// Files to read, in order; none, or `-`, reads standard input.
        files: Vec<PathBuf>,
        /// Largest block accepted, in bytes.
        #[arg(long, default_value_t = schema::Limits::default().max_block_bytes)]
        max_block_bytes: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Decode {
            files,
            max_block_bytes,
        } => decode(files, max_block_bytes),
    }
}

fn decode(files: Vec<PathBuf>, max_block_bytes: usize) -> ExitCode {
    let limits = schema::Limits {
        max_block_bytes,
        ..schema::Limits::default()
    };
    let files = if files.is_empty() {
        vec![PathBuf::from("-")]
    } else {
        files
    };
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for path in files {
        let name = path.display().to_string();
        let result = if name == "-" {
            decode_to(io::stdin().lock(), &mut out, limits)
        } else {
            match File::open(&path) {
                Ok(file) => decode_to(file, &mut out, limits),
                Err(error) => {
                    eprintln!("collector decode: {name}: {error}");
                    return ExitCode::from(66);
                }
            }
        };
        match result {
            Ok(_) => {}
            Err(DecodeFailure::Corrupt(error)) => {
                eprintln!("collector decode: {name}: corrupt stream: {error}");
                return ExitCode::from(65);
            }
            Err(DecodeFailure::Io(error)) if error.kind() == io::ErrorKind::BrokenPipe => {
                return ExitCode::SUCCESS;
            }
            Err(error) => {
                eprintln!("collector decode: {name}: {error}");
                return ExitCode::from(74);
            }
        }
    }
    ExitCode::SUCCESS
}
