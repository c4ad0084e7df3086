//! The `lode` command line, one file per area: its arguments (`args.rs`, `serve.rs`) and
//! each command's client code. It reads the server's answers through `crate::proto` types.

pub mod apps;
pub mod args;
pub mod calls;
pub mod client;
pub mod cluster;
pub mod container;
pub mod deploy;
pub mod dev;
pub mod fs;
pub mod image;
pub mod objects;
pub mod parse;
pub mod python;
pub mod sandbox;
pub mod secrets;
pub mod serve;
pub mod volumes;

pub use client::{ApiClient, ndjson_lines};

use anyhow::Result;

use crate::cli::args::{
    ClientArgs, Command, ContainerCommand, FsCommand, RegistryCommand, SecretCommand, VolumeCommand,
};
use crate::cli::client::{client, deploy_registry, registry};

/// Runs one command, talking to the server and registry that `client` finds.
pub async fn run(client_args: ClientArgs, command: Command) -> Result<()> {
    match command {
        Command::Serve(args) => serve::run(*args).await,
        Command::Cluster(args) => cluster::run(args).await,
        Command::Deploy {
            path,
            name,
            ephemeral,
            registry: flag,
        } => {
            let api = client(&client_args)?;
            let registry = deploy_registry(&client_args, &api, &flag).await?;
            if ephemeral {
                if !crate::cli::python::is_python_app(&path) {
                    anyhow::bail!("--ephemeral is for Python apps (a .py file)");
                }
                let app = crate::cli::python::deploy(
                    &api,
                    registry,
                    &path,
                    crate::cli::python::AppName::Ephemeral,
                )
                .await?
                .app;
                println!("{app}");
                return Ok(());
            }
            if crate::cli::python::is_python_app(&path) {
                crate::cli::python::deploy(
                    &api,
                    registry,
                    &path,
                    name.as_deref().map_or(
                        crate::cli::python::AppName::FromFile,
                        crate::cli::python::AppName::Given,
                    ),
                )
                .await
                .map(|_| ())
            } else {
                crate::cli::deploy::deploy(&api, registry, &path, name.as_deref()).await
            }
        }
        Command::Run {
            file,
            entrypoint,
            args,
            registry: flag,
        } => {
            let api = client(&client_args)?;
            let registry = deploy_registry(&client_args, &api, &flag).await?;
            let code = crate::cli::python::run(&api, registry, &file, entrypoint.as_deref(), &args)
                .await?;
            std::process::exit(code);
        }
        Command::Dev {
            file,
            registry: flag,
        } => {
            if !crate::cli::python::is_python_app(&file) {
                anyhow::bail!(
                    "{} is not a Python file; `lode dev` serves Python apps (a .py file with a lode.App)",
                    file.display()
                );
            }
            let api = client(&client_args)?;
            let registry = deploy_registry(&client_args, &api, &flag).await?;
            let code = dev::dev(&api, registry, &file).await?;
            std::process::exit(code);
        }
        Command::Call { target, args } => {
            let code = crate::cli::calls::call(&client(&client_args)?, &target, &args).await?;
            std::process::exit(code);
        }
        Command::Stats { app } => crate::cli::calls::stats(&client(&client_args)?, &app).await,
        Command::Calls { app, limit, json } => {
            crate::cli::calls::calls(&client(&client_args)?, &app, limit, json).await
        }
        Command::Secret(command) => {
            let api = client(&client_args)?;
            match command {
                SecretCommand::Create { name, pairs } => {
                    crate::cli::secrets::create(&api, &name, &pairs).await
                }
                SecretCommand::Ls => crate::cli::secrets::list(&api).await,
                SecretCommand::Rm { name } => crate::cli::secrets::remove(&api, &name).await,
            }
        }
        Command::Volume(command) => {
            let api = client(&client_args)?;
            match command {
                VolumeCommand::Create { name } => crate::cli::volumes::create(&api, &name).await,
                VolumeCommand::Ls => crate::cli::volumes::list(&api).await,
            }
        }
        Command::Dict(command) => {
            let code = objects::dict(&client(&client_args)?, command).await?;
            std::process::exit(code);
        }
        Command::Queue(command) => {
            let code = objects::queue(&client(&client_args)?, command).await?;
            std::process::exit(code);
        }
        Command::Ls => crate::cli::apps::list(&client(&client_args)?).await,
        Command::Hosts => crate::cli::apps::hosts(&client(&client_args)?).await,
        Command::Rm { app } => crate::cli::apps::remove(&client(&client_args)?, &app).await,
        Command::Logs { app, follow, tail } => {
            crate::cli::apps::logs(&client(&client_args)?, &app, follow, tail).await
        }
        Command::Image(command) => image::run(&client_args, command).await,
        Command::Container(ContainerCommand::Run {
            memory,
            cpu,
            pids,
            timeout,
            net,
            allow_net,
            env,
            volume,
            workdir,
            image,
            command,
        }) => {
            let request = crate::proto::containers::ContainerRequest {
                image,
                argv: command,
                env,
                memory,
                cpu,
                pids,
                timeout,
                network: Some(net),
                allow_net,
                volumes: volume,
                workdir,
            };
            let code = match crate::cli::container::run(&client(&client_args)?, request).await {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    i32::from(crate::cli::container::COULD_NOT_RUN)
                }
            };
            std::process::exit(code)
        }
        Command::Sandbox(command) => {
            let code = sandbox::run(&client(&client_args)?, command).await?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
        Command::Fs(FsCommand::Mount {
            reference,
            mountpoint,
            cache_dir,
            cache_size,
            fetch_timeout,
            no_prefetch,
            threads,
            registry: flag,
        }) => {
            let args = crate::cli::fs::MountArgs {
                reference,
                mountpoint,
                cache_dir,
                cache_size,
                options: lode_fs::MountOptions {
                    fetch_timeout,
                    threads,
                    prefetch: !no_prefetch,
                    ..lode_fs::MountOptions::default()
                },
            };
            crate::cli::fs::mount(registry(&client_args, &flag.registry)?, args).await
        }
        Command::Fs(FsCommand::Umount { mountpoint }) => crate::cli::fs::umount(&mountpoint),
        Command::Registry(RegistryCommand::Serve {
            data_dir,
            listen,
            registry,
        }) => serve::run_registry(data_dir, listen, &registry).await,
    }
}
