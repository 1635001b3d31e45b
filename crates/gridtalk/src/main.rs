//! The gridtalk command: `run` (production), `check`, `dlq replay`, and `demo` (embedded default,
//! only in builds with the `demo` feature).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gridtalk::{run_stages, Stage};
use gridtalk_config::Config;
use gridtalk_telemetry::Readiness;
use tokio_util::sync::CancellationToken;

#[cfg(feature = "demo")]
mod bench;
#[cfg(feature = "demo")]
mod demo;
#[cfg(feature = "demo")]
mod stack;

/// The version and the commit it was built from (`GRIDTALK_COMMIT` at build time, else git's).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("GRIDTALK_COMMIT"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    name = "gridtalk",
    version = VERSION,
    about = "Trading Grid events to WhatsApp messages, and the replies back"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the stages against a Kafka cluster.
    Run {
        #[arg(long, env = "GRIDTALK_CONFIG")]
        config: Option<PathBuf>,
        /// Stages to run in this process: route, send, ingest (needs the webhook secrets), converse.
        #[arg(long, value_delimiter = ',', default_value = "route,send,converse")]
        stages: Vec<Stage>,
    },
    /// Validate the configuration, routing rules, templates and directory without starting
    /// anything; every problem is reported at once, each with its key path.
    Check {
        #[arg(long, env = "GRIDTALK_CONFIG")]
        config: Option<PathBuf>,
        /// The stages whose needs (ids, secrets) are checked too.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "route,send,ingest,converse"
        )]
        stages: Vec<Stage>,
    },
    /// The configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Dead-letter topic tools.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// WhatsApp groups (the Cloud API's Groups endpoints) for summaries and alerts.
    Groups {
        #[command(subcommand)]
        command: GroupsCommand,
    },
    /// The templates the business account has at Meta.
    Templates {
        #[command(subcommand)]
        command: TemplatesCommand,
    },
    /// Everything in one process: embedded broker, all stages, WhatsApp sandbox, sample traffic.
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
    /// Measure decode, planning and pipeline throughput on this machine (embedded broker and sandbox).
    #[cfg(feature = "demo")]
    Bench(bench::BenchArgs),
    /// Only the embedded broker, until SIGINT/SIGTERM: for running `gridtalk run` processes
    /// against locally, and for the fault tests. `--storage sqlite://gridtalk.db` keeps topics,
    /// records, groups and offsets in a SQLite file (relative to the current directory) across
    /// restarts.
    #[cfg(feature = "demo")]
    Broker {
        #[arg(long, default_value_t = 9092)]
        port: u16,
        #[arg(long, default_value = gridtalk_embedded::MEMORY_STORAGE)]
        storage: String,
        /// Require SASL authentication (SASL_PLAINTEXT): PLAIN accepts any password, SCRAM
        /// checks the stored credentials (none in memory storage, so every SCRAM login fails).
        #[arg(long)]
        sasl: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print the effective configuration (defaults, then the file, then `GRIDTALK__*`
    /// variables) as TOML, secrets shown as ***, each value with where it came from.
    Show {
        #[arg(long, env = "GRIDTALK_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum TemplatesCommand {
    /// Compare the configured templates with the business account's catalogue
    /// (`GET /{send.business_account_id}/message_templates`): every missing language, status other
    /// than APPROVED, category, body parameter count and button type that differs, all in one
    /// run. Exits 1 when anything differs.
    Check {
        #[arg(long, env = "GRIDTALK_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum GroupsCommand {
    /// Create a group on the sending number (`send.phone_number_id`). WhatsApp answers with a
    /// request id; the group id and its invite link follow in a `group_lifecycle_update`
    /// webhook, which the converse stage logs ("WhatsApp group created"). Then add the group to
    /// the directory as a contact with `whatsapp_group_id` and the roles it serves.
    Create {
        #[arg(long, env = "GRIDTALK_CONFIG")]
        config: Option<PathBuf>,
        /// The group's name as members see it (at most 128 characters).
        #[arg(long)]
        subject: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Joining needs an approval instead of the link alone.
        #[arg(long)]
        approval_required: bool,
    },
    /// Print a group's invite link (people join by it; nobody can be added directly).
    InviteLink {
        #[arg(long, env = "GRIDTALK_CONFIG")]
        config: Option<PathBuf>,
        group_id: String,
    },
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// Count the dead letters by reason and source topic, with their age and how many were replayed.
    List {
        #[arg(long, env = "GRIDTALK_CONFIG")]
        config: Option<PathBuf>,
        /// One JSON object per group instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Re-publish dead letters to their source topic (or --to-topic).
    Replay {
        #[arg(long, env = "GRIDTALK_CONFIG")]
        config: Option<PathBuf>,
        /// Only letters with this reason code (e.g. unknown_partner).
        #[arg(long)]
        reason: Option<String>,
        /// Only letters that came from this topic.
        #[arg(long)]
        source_topic: Option<String>,
        /// Only records from this partition of the source topic.
        #[arg(long, requires = "source_topic")]
        source_partition: Option<i32>,
        /// Only records at or after this offset of the source partition (as logged when the
        /// record was dead-lettered).
        #[arg(long, requires = "source_partition")]
        from_offset: Option<i64>,
        /// Only records at or before this offset of the source partition.
        #[arg(long, requires = "source_partition")]
        to_offset: Option<i64>,
        /// Only letters written at or after this time: RFC 3339 (2026-12-01T08:00:00Z) or an
        /// age (90s, 30m, 6h, 2d).
        #[arg(long, value_parser = parse_time)]
        since: Option<i64>,
        /// Only letters written at or before this time (same forms as --since).
        #[arg(long, value_parser = parse_time)]
        until: Option<i64>,
        /// Publish to this topic instead of each letter's source topic.
        #[arg(long)]
        to_topic: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
        /// Count what would be replayed; publish nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also replay records that failed again after an earlier replay (never the same letter
        /// twice); without it, a record is replayed once.
        #[arg(long)]
        again: bool,
    },
}

/// A point in time in milliseconds since the epoch: RFC 3339, or an age such as `30m` (that
/// long before now).
fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(at.timestamp_millis());
    }
    let unit_at = text
        .find(|c: char| !c.is_ascii_digit())
        .filter(|&i| i > 0)
        .ok_or_else(|| format!("{text:?} is neither RFC 3339 nor an age like 30m"))?;
    let (amount, unit) = text.split_at(unit_at);
    let seconds: i64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: an age ends in s, m, h or d")),
    };
    let amount: i64 = amount.parse().map_err(|_| format!("{text:?}: too large"))?;
    let ago_ms = amount
        .checked_mul(seconds * 1_000)
        .ok_or_else(|| format!("{text:?}: too large"))?;
    Ok(chrono::Utc::now().timestamp_millis().saturating_sub(ago_ms))
}

fn load(config: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(load_traced(config)?.0)
}

/// The configuration and where each value came from; every problem at once.
fn load_traced(
    config: Option<&PathBuf>,
) -> Result<(Config, gridtalk_config::Sources), gridtalk_config::ConfigErrors> {
    match Config::load_file_report(config.map(|p| p.as_path()), std::env::vars()) {
        (Some(loaded), errors) if errors.is_empty() => Ok(loaded),
        (_, errors) => Err(gridtalk_config::ConfigErrors(errors)),
    }
}

/// Every problem `gridtalk check` finds: the configuration's own, what the stages need, the
/// rules' pointers against the event contract, and the directory file.
fn check_problems(config: Option<&PathBuf>, stages: &[Stage]) -> (Vec<String>, Option<Config>) {
    let (loaded, mut problems) =
        Config::load_file_report(config.map(|p| p.as_path()), std::env::vars());
    // The further checks need a configuration that deserialized; one that does not validate
    // still gets them, so that one run reports everything.
    let Some((config, _)) = loaded else {
        return (problems, None);
    };
    let names: Vec<&str> = stages.iter().map(|s| s.name()).collect();
    problems.extend(config.problems_for(&names));
    problems.extend(build_problems(&config));
    problems.extend(gridtalk_kafka::settings_problems(&config.kafka));
    problems.extend(gridtalk_route::pointer_problems(&config));
    if let Some(path) = &config.directory.file {
        if let Ok(text) = std::fs::read_to_string(path) {
            problems.extend(
                gridtalk_route::Directory::lint_toml(&text)
                    .into_iter()
                    .map(|p| format!("directory {}: {p}", path.display())),
            );
        }
    }
    (problems, Some(config))
}

/// What this build cannot run: a faster clock exists for tests and the demo only, so a production
/// build never sends reminders early because of a stray setting.
fn build_problems(config: &Config) -> Vec<String> {
    let fast = config.clock != gridtalk_config::ClockConfig::default();
    if fast && !cfg!(feature = "demo") {
        vec!["clock: speed, anchor_ms and start_ms are for tests and the demo; this build runs on the wall clock (remove the [clock] settings)".into()]
    } else {
        Vec::new()
    }
}

/// Cancels `token` on the first SIGINT/SIGTERM; a second signal exits at once.
fn handle_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        for round in 0..2 {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if round == 0 {
                tracing::info!(
                    "shutting down: draining in-flight work (a second signal exits at once)"
                );
                token.cancel();
            } else {
                tracing::warn!("second signal: exiting now");
                std::process::exit(130);
            }
        }
    });
}

/// Errors end the process with a message and exit code 1, never a backtrace: they are an
/// operator's to read (a wrong setting, an unreachable cluster), not a developer's.
fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(Cli::parse()));
    // A blocking Kafka call against an unreachable cluster (a metadata fetch at start-up) may
    // still be waiting out its timeout; its answer is no longer wanted, so the process does not
    // wait for it.
    runtime.shutdown_timeout(Duration::from_millis(500));
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, stages } => {
            let config = load(config.as_ref())?;
            let names: Vec<&str> = stages.iter().map(|s| s.name()).collect();
            let mut problems = config.problems_for(&names);
            problems.extend(build_problems(&config));
            if !problems.is_empty() {
                anyhow::bail!(gridtalk_config::ConfigErrors(problems));
            }
            gridtalk_telemetry::Metrics::global()
                .set_build(env!("CARGO_PKG_VERSION"), env!("GRIDTALK_COMMIT"));
            gridtalk::start_metrics_at_zero(&config, &stages);
            let config = Arc::new(config);
            gridtalk_telemetry::init_logging(&config.admin.log_format);
            let shutdown = CancellationToken::new();
            handle_signals(shutdown.clone());
            let readiness = Readiness::default();
            let admin = tokio::spawn(gridtalk_telemetry::serve_admin(
                config.admin.listen,
                readiness.clone(),
                shutdown.clone(),
            ));
            let deadline = Duration::from_millis(config.admin.shutdown_deadline_ms);
            let running = {
                let shutdown = shutdown.clone();
                tokio::spawn(async move { run_stages(config, &stages, readiness, shutdown).await })
            };
            // Once shutting down, the stages get their drain deadline plus time to commit and leave
            // the group; past that the process exits rather than outlive its grace period.
            let result = tokio::select! {
                joined = running => joined.unwrap_or_else(|e| Err(anyhow::anyhow!("stages panicked: {e}"))),
                _ = async {
                    shutdown.cancelled().await;
                    tokio::time::sleep(deadline + Duration::from_secs(10)).await;
                } => Err(anyhow::anyhow!("stages did not stop within the shutdown deadline")),
            };
            shutdown.cancel();
            let _ = admin.await;
            result
        }
        Command::Check { config, stages } => {
            let (problems, config) = check_problems(config.as_ref(), &stages);
            if !problems.is_empty() {
                for problem in &problems {
                    eprintln!("  - {problem}");
                }
                anyhow::bail!("{} problems in the configuration", problems.len());
            }
            let config = config.expect("a configuration without problems");
            if let Some(path) = &config.directory.file {
                let directory =
                    gridtalk_route::Directory::load(path).map_err(anyhow::Error::msg)?;
                let (partners, contacts) = directory.counts();
                println!("directory: {partners} partners, {contacts} contacts");
            }
            println!(
                "configuration valid: {} rules, {} templates, input topics {:?}",
                config.rules.len(),
                config.templates.len(),
                config.topics.inputs
            );
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Show { config },
        } => {
            let (config, sources) = load_traced(config.as_ref())?;
            print!("{}", gridtalk_config::render(&config, &sources));
            Ok(())
        }
        Command::Templates {
            command: TemplatesCommand::Check { config },
        } => {
            let config = load(config.as_ref())?;
            let waba = config.send.business_account_id.clone().ok_or_else(|| {
                anyhow::anyhow!(
                    "send.business_account_id: the WhatsApp Business Account id is not set"
                )
            })?;
            let token = config
                .read_access_token()
                .map_err(|e| anyhow::anyhow!("send.access_token / send.access_token_file: {e}"))?;
            let catalogue = gridtalk_whatsapp::catalogue::fetch_catalogue(
                &config.send.api_base_url,
                &config.send.api_version,
                &waba,
                &token,
                std::time::Duration::from_millis(config.send.request_timeout_ms),
            )
            .await
            .context("reading the business account's templates")?;
            let found = gridtalk_whatsapp::catalogue::mismatches(&config.templates, &catalogue);
            let languages: usize = config.templates.iter().map(|t| t.languages.len()).sum();
            if found.is_empty() {
                println!(
                    "{} templates in {languages} languages match the business account's {} ({} listed)",
                    config.templates.len(),
                    waba,
                    catalogue.len()
                );
                return Ok(());
            }
            for mismatch in &found {
                println!("{mismatch}");
            }
            println!(
                "{} mismatches between the configured templates and business account {waba}",
                found.len()
            );
            std::process::exit(1);
        }
        Command::Groups { command } => {
            let (config, answer) = match &command {
                GroupsCommand::Create { config, .. } | GroupsCommand::InviteLink { config, .. } => {
                    let config = load(config.as_ref())?;
                    let client = gridtalk_whatsapp::GroupsClient::new(
                        &config.send.api_base_url,
                        &config.send.api_version,
                        std::time::Duration::from_millis(config.send.request_timeout_ms),
                    );
                    (config, client)
                }
            };
            let token = config
                .read_access_token()
                .map_err(|e| anyhow::anyhow!("send.access_token / send.access_token_file: {e}"))?;
            match command {
                GroupsCommand::Create {
                    subject,
                    description,
                    approval_required,
                    ..
                } => {
                    let request_id = answer
                        .create(
                            &token,
                            &config.send.phone_number_id,
                            &subject,
                            &description,
                            approval_required,
                        )
                        .await?;
                    println!(
                        "group {subject:?} requested (request id {request_id}); its group id and invite link follow in a group_lifecycle_update webhook, which the converse stage logs"
                    );
                }
                GroupsCommand::InviteLink { group_id, .. } => {
                    println!("{}", answer.invite_link(&token, &group_id).await?);
                }
            }
            Ok(())
        }
        Command::Dlq {
            command: DlqCommand::List { config, json },
        } => {
            // No log lines: stdout is the listing, which scripts read (`--json`).
            let config = load(config.as_ref())?;
            let groups = {
                let config = config.clone();
                tokio::task::spawn_blocking(move || {
                    gridtalk_kafka::list_dead_letters(
                        &config.kafka,
                        &config.topics.dlq,
                        &gridtalk_kafka::ReplayLedger {
                            topic: &config.topics.dlq_replays,
                        },
                    )
                })
                .await?
                .context("reading the dead-letter topic")?
            };
            let time = |ms: i64| {
                chrono::DateTime::from_timestamp_millis(ms)
                    .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                    .unwrap_or_else(|| "-".into())
            };
            if json {
                for g in &groups {
                    println!(
                        "{}",
                        serde_json::json!({
                            "reason": g.reason, "source_topic": g.source_topic,
                            "letters": g.letters, "replayed": g.replayed,
                            "oldest": time(g.oldest_ms), "newest": time(g.newest_ms),
                        })
                    );
                }
            } else {
                println!(
                    "{:<28} {:<32} {:>8} {:>9}  {:<20} {:<20}",
                    "reason", "source topic", "letters", "replayed", "oldest", "newest"
                );
                for g in &groups {
                    println!(
                        "{:<28} {:<32} {:>8} {:>9}  {:<20} {:<20}",
                        g.reason,
                        g.source_topic,
                        g.letters,
                        g.replayed,
                        time(g.oldest_ms),
                        time(g.newest_ms)
                    );
                }
            }
            Ok(())
        }
        Command::Dlq {
            command:
                DlqCommand::Replay {
                    config,
                    reason,
                    source_topic,
                    source_partition,
                    from_offset,
                    to_offset,
                    since,
                    until,
                    to_topic,
                    limit,
                    dry_run,
                    again,
                },
        } => {
            let config = load(config.as_ref())?;
            gridtalk_telemetry::init_logging("text");
            if let Some(code) = reason.as_deref() {
                if gridtalk_contract::DeadLetterReason::from_code(code).is_none() {
                    let known: Vec<&str> = gridtalk_contract::DeadLetterReason::ALL
                        .iter()
                        .map(|r| r.as_str())
                        .collect();
                    anyhow::bail!(
                        "--reason {code:?} is no reason gridtalk writes; known reasons: {}",
                        known.join(", ")
                    );
                }
            }
            let producer = gridtalk_kafka::producer(&config.kafka)?;
            if config.topics.create {
                gridtalk_kafka::ensure_topics(
                    &config.kafka,
                    &gridtalk::internal_topics(&config)
                        .into_iter()
                        .filter(|t| t.name == config.topics.dlq_replays)
                        .collect::<Vec<_>>(),
                )
                .await?;
            }
            let filter = gridtalk_kafka::ReplayFilter {
                reason,
                source_topic,
                source_partition,
                from_offset,
                to_offset,
                since_ms: since,
                until_ms: until,
                to_topic,
                limit,
                dry_run,
                again,
            };
            let started = std::time::Instant::now();
            let mut last_shown = started;
            let report = gridtalk_kafka::replay_dead_letters(
                &config.kafka,
                &producer,
                &config.topics.dlq,
                &gridtalk_kafka::ReplayLedger {
                    topic: &config.topics.dlq_replays,
                },
                &filter,
                |so_far| {
                    // A progress line on stderr at most every two seconds on long replays.
                    if last_shown.elapsed() >= std::time::Duration::from_secs(2) {
                        last_shown = std::time::Instant::now();
                        let rate = so_far.replayed as f64 / started.elapsed().as_secs_f64();
                        eprintln!(
                            "… scanned {}, replayed {} ({rate:.0}/s)",
                            so_far.scanned, so_far.replayed
                        );
                    }
                },
            )
            .await
            .context("replaying dead letters")?;
            println!(
                "scanned {} dead letters, {} {}",
                report.scanned,
                if dry_run { "would replay" } else { "replayed" },
                report.replayed
            );
            if report.already_replayed > 0 {
                println!(
                    "skipped {} letters whose records were replayed before (--again replays those \
                     that failed again since)",
                    report.already_replayed
                );
            }
            if report.not_yet_due > 0 {
                println!(
                    "left {} letters whose retry time has not come (WhatsApp asked for a day's \
                     wait; their gridtalk.dlq.retry_not_before header says when)",
                    report.not_yet_due
                );
            }
            if report.truncated_skipped > 0 {
                println!(
                    "skipped {} truncated letters (records too large to dead-letter whole; \
                     their headers carry the original size and SHA-256)",
                    report.truncated_skipped
                );
            }
            Ok(())
        }
        #[cfg(feature = "demo")]
        Command::Demo(args) => demo::run(args).await,
        #[cfg(feature = "demo")]
        Command::Bench(args) => bench::run(args).await,
        #[cfg(feature = "demo")]
        Command::Broker {
            port,
            storage,
            sasl,
        } => {
            gridtalk_telemetry::init_logging("text");
            let bootstrap =
                gridtalk_embedded::start_broker_with_storage(port, &storage, sasl).await?;
            let security = if sasl { ", SASL required" } else { "" };
            println!("broker listening on {bootstrap} (storage {storage}{security})");
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            Ok(())
        }
    }
}
