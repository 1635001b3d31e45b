//! `gridtalk demo`: the embedded default. One process runs an in-memory Kafka-compatible broker,
//! the route and send stages, the WhatsApp sandbox and a generator of Trading Grid events for all
//! flows, and prints every message as the recipient's phone would show it.

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
}

/// Prints the messages the sandbox accepted since the first `shown`, as the phone shows them;
/// returns the new count.
fn print_new_messages(sandbox: &Sandbox, shown: usize) -> usize {
    let new = sandbox.messages_since(shown);
    for m in &new {
        println!(
            "📱 {} [{} {}] {}",
            gridtalk_telemetry::mask_phone(&m.to),
            m.template.as_deref().unwrap_or("text"),
            m.language.as_deref().unwrap_or("-"),
            m.rendered
        );
    }
    shown + new.len()
}

/// Whether the route group committed every input event and the send group every outbox message,
/// i.e. every event is routed and every message sent or dead-lettered.
async fn worked_off(config: &Arc<Config>) -> bool {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        let route = format!("{}-route", config.kafka.group_prefix);
        let send = format!("{}-send", config.kafka.group_prefix);
        let inputs: Vec<&str> = config.topics.inputs.iter().map(String::as_str).collect();
        gridtalk_kafka::caught_up(&config.kafka, &route, &inputs).unwrap_or(false)
            && gridtalk_kafka::caught_up(&config.kafka, &send, &[&config.topics.outbox])
                .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    gridtalk_telemetry::init_logging("text");
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
        vec![("ADMIN__LISTEN", format!("127.0.0.1:{admin_port}"))],
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
        "  WhatsApp sandbox        {}/_sandbox/messages  (stats: /_sandbox/stats)",
        sandbox.base_url()
    );
    println!(
        "  metrics and health      http://127.0.0.1:{}/metrics  /healthz  /readyz",
        admin_port
    );
    println!(
        "  webhook endpoint        {}  (ingest stage; the sandbox posts status webhooks here)",
        stack.webhook_url()
    );
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
        ],
        readiness,
        shutdown.clone(),
    ));

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
        shown = print_new_messages(sandbox, shown);
        if generator.as_ref().is_some_and(|g| g.is_finished()) {
            let finished = generator.take().expect("checked");
            generated = Some(match finished.await {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(e.context("traffic generator")),
                Err(e) => anyhow::bail!("traffic generator panicked: {e}"),
            });
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
    let stats = sandbox.stats();
    println!();
    println!(
        "demo finished: {} events generated, {} messages accepted by the sandbox, errors by code {:?}, {} status webhooks delivered to gridtalk",
        generated.map_or("?".into(), |g| g.to_string()),
        stats.accepted,
        stats.errors,
        stats.webhooks_sent
    );
    stage_result?;
    if args.events.is_some() && stats.accepted == 0 {
        anyhow::bail!("no message reached the sandbox");
    }
    Ok(())
}
