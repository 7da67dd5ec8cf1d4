//! `trellis-cni`: invoked by the container runtime with `CNI_*` in the environment and the
//! network configuration on stdin; prints a result or the spec's error JSON on stdout.

use std::io::Read;
use std::process::ExitCode;

use trellis_cni::commands;
use trellis_cni::config::{NetConf, peek_version};
use trellis_cni::dataplane::KernelDataplane;
use trellis_cni::env::{Command, Environment};
use trellis_cni::error::{CniError, code};
use trellis_cni::{SPEC_VERSION, SUPPORTED_VERSIONS};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let reply_version = peek_version(&stdin)
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| SPEC_VERSION.to_string());
    let outcome = read
        .map_err(|e| {
            CniError::new(
                code::IO_FAILURE,
                "cannot read the network configuration from stdin",
                e.to_string(),
            )
        })
        .and_then(|_| run(&stdin));
    match outcome {
        Ok(Some(output)) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(error) => {
            println!("{}", error.to_json(&reply_version));
            ExitCode::FAILURE
        }
    }
}

fn run(stdin: &[u8]) -> Result<Option<String>, CniError> {
    let environment = Environment::from_process()?;
    if environment.command == Command::Version {
        return Ok(Some(commands::version_json()));
    }
    let conf = NetConf::parse(stdin)?;
    if environment.command == Command::Status {
        return commands::status(&conf).map(|()| None);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| {
            CniError::new(
                code::IO_FAILURE,
                "cannot start the async runtime",
                e.to_string(),
            )
        })?;
    runtime.block_on(async {
        let dataplane = KernelDataplane::connect()?;
        match (environment.command, &environment.attachment) {
            (Command::Add, Some(attachment)) => {
                let result = commands::add(&dataplane, &conf, attachment).await?;
                let json = serde_json::to_string(&result).map_err(|e| {
                    CniError::new(code::IO_FAILURE, "cannot encode the result", e.to_string())
                })?;
                Ok(Some(json))
            }
            (Command::Del, Some(attachment)) => commands::del(&dataplane, &conf, attachment)
                .await
                .map(|()| None),
            (Command::Check, Some(attachment)) => commands::check(&dataplane, &conf, attachment)
                .await
                .map(|()| None),
            (Command::Gc, _) => commands::gc(&dataplane, &conf).await.map(|()| None),
            (command, _) => Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                "command is missing its container",
                format!("{command:?}"),
            )),
        }
    })
}
