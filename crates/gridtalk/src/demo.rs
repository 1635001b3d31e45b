//! `gridtalk demo`: the embedded default. One process runs an in-memory Kafka-compatible broker,
//! all four stages, the WhatsApp sandbox with its phones page and a generator of Trading Grid
//! events for all flows. It prints every message as the recipient's phone shows it and every
//! record the way back publishes; a person answers on the phones page (or, with `--auto-answer`,
//! the demo taps the first button of every request itself).

use std::sync::Arc;
use std::time::Duration;

use gridtalk_config::Config;
use gridtalk_sandbox::Sandbox;
use gridtalk_telemetry::Readiness;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Stop after this many events, once every one of them is routed and every message is sent or
    /// dead-lettered; default: run until Ctrl-C.
    #[arg(long)]
    events: Option<u64>,
    /// Events generated per second.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Port of the WhatsApp sandbox (0 picks a free one).
    #[arg(long, default_value_t = 18080)]
    sandbox_port: u16,
    /// Port of /metrics, /healthz and /readyz.
    #[arg(long, default_value_t = 9464)]
    admin_port: u16,
    /// Tap the first button of every message that has buttons, as a person on the phones page
    /// would, so the way back runs without anyone at the browser.
    #[arg(long)]
    auto_answer: bool,
    /// How much faster than the wall clock the request clocks run: at the default an hour passes
    /// every second, so the first reminders and escalations show within the first minute
    /// (orders are due a day after they arrive). 1 runs them on the wall clock.
    #[arg(long, default_value_t = 3600.0)]
    clock_speed: f64,
    /// Do not try to open the phones page in a browser.
    #[arg(long)]
    no_browser: bool,
    /// Show the log in the terminal too (by default it goes to a file whose path is printed).
    #[arg(long)]
    verbose: bool,
    /// Log filter, e.g. `debug` or `info,gridtalk_send=debug` (default: `RUST_LOG`, else info).
    #[arg(long)]
    log_level: Option<String>,
}

/// Where the demo writes its log unless `--verbose`.
fn log_file() -> std::path::PathBuf {
    std::env::temp_dir().join("gridtalk-demo.log")
}

/// Opens `url` in the desktop's browser when there is a desktop; the URL is printed regardless.
fn open_in_browser(url: &str) {
    let desktop = std::env::var_os("DISPLAY").is_some()
        || std::env::var_os("WAYLAND_DISPLAY").is_some()
        || cfg!(target_os = "macos");
    if !desktop || std::env::var_os("CI").is_some() {
        return;
    }
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    let _ = std::process::Command::new(opener)
        .arg(url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
}

/// Prints the records of the response and audit topics as they arrive, until `shutdown`; returns
/// how many decisions (responses other than delivery statuses) it saw.
fn print_way_back(
    config: Arc<Config>,
    shutdown: CancellationToken,
    counted: Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<u64> {
    use gridtalk_contract::{AuditRecord, AvroRecord, ResponseBody, WorkflowResponse};
    use rdkafka::consumer::Consumer;
    use rdkafka::message::Message;
    // The stages create the topics; subscribing before they exist makes librdkafka log an error.
    let topics = [config.topics.responses.clone(), config.topics.audit.clone()];
    while !shutdown.is_cancelled()
        && !gridtalk_kafka::missing_topics(&config.kafka, &topics).is_ok_and(|m| m.is_empty())
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let consumer = gridtalk_kafka::tail_consumer(&config.kafka)?;
    consumer.subscribe(&[&config.topics.responses, &config.topics.audit])?;
    let mut answers = 0;
    while !shutdown.is_cancelled() {
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(250)) else {
            continue;
        };
        let payload = message.payload().unwrap_or_default();
        if message.topic() == config.topics.audit {
            if let Ok(a) = AuditRecord::from_avro(payload) {
                println!(
                    "🛡  refused ({}) {}: {}",
                    a.reason,
                    a.request_id.as_deref().unwrap_or("-"),
                    a.detail
                );
            }
            continue;
        }
        let Ok(r) = WorkflowResponse::from_avro(payload) else {
            continue;
        };
        let what = match &r.body {
            ResponseBody::DeliveryStatus { .. } => continue,
            ResponseBody::RequestOverdue {
                step,
                steps,
                escalation,
                hours_overdue,
                notified_contact_ids,
                ..
            } => {
                println!(
                    "⏰ {} {} overdue by {hours_overdue} h: {} {step} of {steps} to {}",
                    r.response_type,
                    r.request_id.as_deref().unwrap_or("-"),
                    if *escalation {
                        "escalation"
                    } else {
                        "reminder"
                    },
                    notified_contact_ids.join(", ")
                );
                continue;
            }
            ResponseBody::PoAckDecision { decision, .. }
            | ResponseBody::ApprovalDecision { decision, .. } => decision.clone(),
            ResponseBody::OnboardingAcknowledgement { action, .. } => action.clone(),
            ResponseBody::CorrectionAnswer { answer, .. } => answer.clone(),
            ResponseBody::CaseMessage { text, .. } => format!("{text:?}"),
        };
        answers += 1;
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        println!(
            "↩  {} {} {} from {} (correlation {})",
            r.response_type,
            r.request_id.as_deref().unwrap_or("new case"),
            what,
            r.contact_id.as_deref().unwrap_or("unknown contact"),
            r.correlation_id
        );
    }
    Ok(answers)
}

/// How often the demo prints its one-line summary.
const SUMMARY_EVERY: Duration = Duration::from_secs(30);

/// One line: how much has happened since the start.
fn print_summary(
    started: std::time::Instant,
    sandbox: &Sandbox,
    answered: &std::sync::atomic::AtomicU64,
) {
    let metrics = gridtalk_telemetry::Metrics::global();
    println!(
        "⏱  {} s: {} events read, {} messages on the phones, {} answers back, {} dead letters",
        started.elapsed().as_secs(),
        gridtalk_telemetry::Metrics::total(&metrics.events_consumed),
        sandbox.stats().accepted,
        answered.load(std::sync::atomic::Ordering::Relaxed),
        gridtalk_telemetry::Metrics::total(&metrics.dead_letters),
    );
}

/// Prints the messages the sandbox accepted since the first `shown`, as the phone shows them;
/// returns the new count.
fn print_new_messages(sandbox: &Sandbox, shown: usize) -> usize {
    let new = sandbox.messages_since(shown);
    for m in &new {
        // The directory's name for the recipient; the number stays masked, as in the logs.
        let to = match (sandbox.person(&m.to), sandbox.group(&m.to)) {
            (Some(person), _) => format!(
                "{} ({})",
                person.name,
                gridtalk_telemetry::mask_phone(&m.to)
            ),
            (None, Some(group)) => format!(
                "👥 {} ({} members)",
                group.subject,
                group.participants.len()
            ),
            (None, None) => gridtalk_telemetry::mask_phone(&m.to),
        };
        println!(
            "📱 {to} [{} {}] {}",
            m.template.as_deref().unwrap_or("text"),
            m.language.as_deref().unwrap_or("-"),
            m.rendered
        );
    }
    shown + new.len()
}

/// Whether the route group committed every input event, the send group every outbox message and
/// the converse group every webhook item and the decide group every deciding tap: every event
/// routed, every message sent or dead-lettered, every reply and status answered.
async fn worked_off(config: &Arc<Config>) -> bool {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        let route = format!("{}-route", config.kafka.group_prefix);
        let send = format!("{}-send", config.kafka.group_prefix);
        let converse = format!("{}-converse", config.kafka.group_prefix);
        let decide = format!("{}-decide", config.kafka.group_prefix);
        let inputs: Vec<&str> = config.topics.inputs.iter().map(String::as_str).collect();
        gridtalk_kafka::caught_up(&config.kafka, &route, &inputs).unwrap_or(false)
            && gridtalk_kafka::caught_up(&config.kafka, &send, &[&config.topics.outbox])
                .unwrap_or(false)
            && gridtalk_kafka::caught_up(&config.kafka, &converse, &[&config.topics.webhook])
                .unwrap_or(false)
            && gridtalk_kafka::caught_up(&config.kafka, &decide, &[&config.topics.decisions])
                .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let log_path = log_file();
    if args.verbose {
        gridtalk_telemetry::init_logging_with("text", args.log_level.as_deref(), None);
    } else {
        let file = std::fs::File::create(&log_path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", log_path.display()))?;
        gridtalk_telemetry::init_logging_with("text", args.log_level.as_deref(), Some(file));
    }
    let shutdown = CancellationToken::new();
    super::handle_signals(shutdown.clone());

    let admin_port = match args.admin_port {
        0 => gridtalk_embedded::free_port()?,
        port => port,
    };
    let stack = crate::stack::EmbeddedStack::start(
        "demo",
        args.sandbox_port,
        |_| {},
        vec![
            ("ADMIN__LISTEN", format!("127.0.0.1:{admin_port}")),
            ("CLOCK__SPEED", format!("{:?}", args.clock_speed)),
            // Summaries gridtalk computes: operations (and their group) every morning, each
            // partner's order desk too, with an alert on a burst of shipment exceptions. On the
            // demo's fast clock the first morning comes within the first minute.
            (
                "SUMMARIES",
                concat!(
                    r#"[{name = "operations", audience = {internal_roles = ["operations"]}, daily_at = "08:00", time_zone = "Europe/Berlin", template = "computed_summary"}, "#,
                    r#"{name = "order-desks", per_partner = true, audience = {partner_roles = ["order_desk"]}, daily_at = "07:30", time_zone = "America/Chicago", template = "computed_summary", "#,
                    r#"thresholds = [{measure = "open_exceptions", at_least = 3, within_minutes = 60}]}]"#
                )
                .into(),
            ),
        ],
        shutdown.clone(),
    )
    .await?;
    // The sandbox posts its signed status webhooks to the ingest stage, as Meta would.
    stack.sandbox.set_webhook_url(Some(stack.webhook_url()));
    let (bootstrap, sandbox, config) = (
        stack.bootstrap.clone(),
        &stack.sandbox,
        stack.config.clone(),
    );
    println!();
    println!("gridtalk demo");
    println!("  embedded Kafka broker   {bootstrap}");
    println!(
        "  phones (tap, reply)     {}/  ← open this page to answer as the recipients",
        sandbox.base_url()
    );
    println!(
        "  WhatsApp sandbox        {}/_sandbox/messages  (stats: /_sandbox/stats)",
        sandbox.base_url()
    );
    println!(
        "  metrics and health      http://127.0.0.1:{}/metrics  /healthz  /readyz",
        admin_port
    );
    println!(
        "  webhook endpoint        {}  (ingest stage; the sandbox posts signed webhooks here)",
        stack.webhook_url()
    );
    println!(
        "  responses               topic {} (audit: {})",
        config.topics.responses, config.topics.audit
    );
    if args.verbose {
        println!("  log                     here (--log-level or RUST_LOG to filter)");
    } else {
        println!(
            "  log                     {}  (--verbose shows it here)",
            log_path.display()
        );
    }
    if args.clock_speed != 1.0 {
        println!(
            "  request clocks          {}x the wall clock (reminders, escalations; --clock-speed)",
            args.clock_speed
        );
    }
    println!("  Ctrl-C stops (in-flight sends drain first)");
    println!();

    let readiness = Readiness::default();
    let admin = tokio::spawn(gridtalk_telemetry::serve_admin(
        config.admin.listen,
        readiness.clone(),
        shutdown.clone(),
    ));
    let stages = tokio::spawn(crate::run_stages(
        config.clone(),
        &[
            crate::Stage::Route,
            crate::Stage::Send,
            crate::Stage::Ingest,
            crate::Stage::Converse,
        ],
        readiness,
        shutdown.clone(),
    ));

    if !args.no_browser {
        open_in_browser(&format!("{}/", sandbox.base_url()));
    }
    let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let way_back = {
        let (config, stop, counted) = (config.clone(), shutdown.clone(), answered.clone());
        tokio::task::spawn_blocking(move || print_way_back(config, stop, counted))
    };
    let started = std::time::Instant::now();
    let mut summarised = started;

    let generator = {
        let (bootstrap, shutdown) = (bootstrap.clone(), shutdown.clone());
        tokio::spawn(async move {
            gridtalk_embedded::generate(
                &bootstrap,
                &crate::stack::PARTNERS,
                args.rate,
                args.events,
                shutdown,
            )
            .await
        })
    };

    // Print what the phones receive, until Ctrl-C or (with --events) everything is worked off.
    let mut generator = Some(generator);
    let mut generated: Option<u64> = None;
    let mut shown = 0;
    let mut polls = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        let before = shown;
        shown = print_new_messages(sandbox, shown);
        if args.auto_answer {
            for m in sandbox.messages_since(before) {
                if !m.buttons.is_empty() {
                    if let Err(e) = sandbox
                        .reply(&m.wamid, gridtalk_sandbox::Reply::Button { index: 0 })
                        .await
                    {
                        tracing::warn!(error = %e, "automatic answer not delivered");
                    }
                }
            }
        }
        if generator.as_ref().is_some_and(|g| g.is_finished()) {
            let finished = generator.take().expect("checked");
            generated = Some(match finished.await {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(e.context("traffic generator")),
                Err(e) => anyhow::bail!("traffic generator panicked: {e}"),
            });
        }
        if summarised.elapsed() >= SUMMARY_EVERY {
            summarised = std::time::Instant::now();
            print_summary(started, sandbox, &answered);
        }
        polls += 1;
        if generated.is_some() && polls % 5 == 0 && worked_off(&config).await {
            break;
        }
    }
    shown = print_new_messages(sandbox, shown);
    shutdown.cancel();
    if let Some(generator) = generator.take() {
        // Stopped by Ctrl-C: the generator returns how many events it published.
        if let Ok(Ok(n)) = generator.await {
            generated = Some(n);
        }
    }
    let stage_result = stages.await?;
    print_new_messages(sandbox, shown);
    let _ = admin.await;
    let answers = way_back.await??;
    let stats = sandbox.stats();
    println!();
    println!(
        "demo finished: {} events generated, {} messages accepted by the sandbox, errors by code {:?}, {} webhooks delivered to gridtalk, {} answers on the response topic",
        generated.map_or("?".into(), |g| g.to_string()),
        stats.accepted,
        stats.errors,
        stats.webhooks_sent,
        answers
    );
    stage_result?;
    if args.events.is_some() && stats.accepted == 0 {
        anyhow::bail!("no message reached the sandbox");
    }
    if args.events.is_some() && args.auto_answer && answers == 0 {
        anyhow::bail!("no answer came back on the response topic");
    }
    Ok(())
}
