//! The send stage's strategy for the driver: per-recipient queues, requests on the wire bounded
//! separately.
//!
//! Accepted outbox records wait in their recipient's queue (outbox order); one worker per
//! recipient with queued messages sends them one at a time. A worker waiting for its
//! recipient's pair limit, for a retry backoff or for a halted number to recover holds nothing
//! but its place in line: a place among the requests on the wire (`send.max_in_flight`) is taken
//! only for the request itself, so one busy recipient never slows the number's others.
//!
//! Back-pressure: the driver is pushed back (and pauses the outbox partitions) when
//! `send.max_queued` messages wait, and while the number is halted (one message is kept to probe
//! with). A revoked partition's queued messages are dropped at once and left to the new owner;
//! a request already on the wire is an effect the revoke waits for, so its outcome reaches the
//! sent index before the partition moves. After a revoke, no message of the partition is sent
//! from here.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rand::Rng;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;

use gridtalk_config::{Config, Secret};
use gridtalk_contract::{AvroRecord, OutboxMessage, SentMessage};
use gridtalk_kafka::driver::{Record, StageFailure, Strategy, Submit, Ticket, TopicPartition};
use gridtalk_kafka::{dead_letter, DeadLetterReason};
use gridtalk_telemetry::{mask_phone, Metrics};
use gridtalk_whatsapp::{CloudApiClient, ErrorClass, RetryScope};

use crate::coalesce::Coalescing;
use crate::in_doubt::{with_callback, InDoubt, Resolved};
use crate::index::{IndexedSend, SentIndex};
use crate::limits::SendLimits;
use crate::windows::Windows;

pub(crate) const STAGE: &str = "send";
/// How often expired sent-index entries are deleted and idle pair-limiter state dropped.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(60);
/// How often a message waiting for a halted number checks that its partition is still here.
const HALT_OWNERSHIP_CHECK: Duration = Duration::from_secs(1);

/// One outbox message on its way.
struct Job {
    message: OwnedMessage,
    outbox: OutboxMessage,
    ticket: Ticket,
    /// Whether coalescing may merge it (decided once, when the record arrives: the queue scans
    /// ask it again and again).
    informational: bool,
}

/// What the strategy and every recipient worker share.
pub(crate) struct Sending {
    pub config: Arc<Config>,
    pub producer: FutureProducer,
    pub client: CloudApiClient,
    pub token: RwLock<Secret>,
    pub limits: SendLimits,
    /// Queued messages per recipient; a recipient has an entry exactly while its worker runs.
    queues: Mutex<HashMap<String, VecDeque<Job>>>,
    /// Messages accepted and not done (queued, or held by a worker).
    pending: AtomicUsize,
    /// Requests on the wire.
    on_the_wire: Semaphore,
    halted: watch::Sender<bool>,
    /// Held by the one worker that probes while the number is halted.
    prober: tokio::sync::Mutex<()>,
    /// What WhatsApp already accepted, per held outbox partition.
    index: Mutex<SentIndex>,
    /// Signalled whenever a message is done (room for more) or the number recovers.
    room: Notify,
    /// Signalled whenever a message joins a recipient's queue (a worker holding a digest looks
    /// for a request that may go first).
    arrivals: Notify,
    /// Bursts merged into digests (`None` when `send.coalesce.window_ms` is 0).
    coalescing: Option<Coalescing>,
    /// When each recipient last got an informational message: coalescing's window. In memory
    /// only: after a restart a burst may get one message more.
    last_informational: Mutex<HashMap<String, Instant>>,
    /// Sends in doubt resolved from status webhooks (`None` when `send.in_doubt_wait_ms` is 0).
    in_doubt: Option<InDoubt>,
    /// The recipients' customer-service windows, from the webhook topic.
    windows: Windows,
}

impl Sending {
    pub(crate) fn new(
        config: Arc<Config>,
        producer: FutureProducer,
        client: CloudApiClient,
        token: Secret,
    ) -> Self {
        Sending {
            producer,
            client,
            token: RwLock::new(token),
            limits: SendLimits::new(&config.send),
            queues: Mutex::new(HashMap::new()),
            pending: AtomicUsize::new(0),
            on_the_wire: Semaphore::new(config.send.max_in_flight.max(1)),
            halted: watch::channel(false).0,
            prober: tokio::sync::Mutex::new(()),
            index: Mutex::new(SentIndex::default()),
            room: Notify::new(),
            arrivals: Notify::new(),
            coalescing: Coalescing::new(&config.send.coalesce, &config.templates),
            last_informational: Mutex::new(HashMap::new()),
            in_doubt: InDoubt::new(
                &config.kafka,
                &config.topics.webhook,
                config.send.in_doubt_wait_ms,
            ),
            windows: Windows::follow(&config.kafka, &config.topics.webhook),
            config,
        }
    }

    /// Templates the catalogue lists as not sendable stop before a message tries them.
    pub(crate) fn seed_template_statuses(
        &self,
        catalogue: &[gridtalk_whatsapp::catalogue::CatalogueTemplate],
    ) {
        for t in catalogue {
            self.windows
                .template_status(&t.name, &t.language, &t.status);
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.kafka.request_timeout_ms)
    }

    /// A message accepted earlier is done (sent, dead-lettered, skipped or dropped).
    fn done(&self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
        self.room.notify_one();
    }

    /// Whether a message still needs sending by this process: its partition is still here, and
    /// WhatsApp has not accepted it yet (such a replay is counted, logged and finished here).
    /// Asked when the record arrives, when its turn comes and after every wait.
    fn still_to_send(&self, job: Job) -> Option<Job> {
        if !job.ticket.owned() {
            tracing::debug!(
                partition = job.message.partition(),
                "partition revoked; message left to its new owner"
            );
            return None;
        }
        let accepted = self
            .index
            .lock()
            .expect("index")
            .accepted(job.message.partition(), &job.outbox.message_id);
        match accepted {
            Some(wamid) => {
                Metrics::global()
                    .sends
                    .with_label_values(&["replay_suppressed", "none"])
                    .inc();
                tracing::debug!(wamid = %gridtalk_telemetry::mask_wamid(&wamid), message_id = %job.outbox.message_id, "outbox replay of an accepted message skipped");
                job.ticket.finish();
                None
            }
            None => Some(job),
        }
    }

    /// How far back a send still weighs on its recipient's pair limit.
    fn pair_memory_ms(&self) -> i64 {
        i64::try_from(self.limits.pair_memory().as_millis()).unwrap_or(i64::MAX)
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let initial = self.config.send.retry_initial_backoff_ms as f64;
        let max = self.config.send.retry_max_backoff_ms as f64;
        let base = (initial * 2f64.powi(attempt.min(20) as i32)).min(max);
        // Full jitter between half and the whole backoff.
        Duration::from_millis(rand::rng().random_range(base / 2.0..=base.max(1.0)) as u64)
    }

    fn report_on_the_wire(&self) {
        let max = self.config.send.max_in_flight.max(1);
        Metrics::global()
            .sends_in_flight
            .set((max - self.on_the_wire.available_permits()) as i64);
    }
}

pub(crate) struct SendStrategy {
    sending: Arc<Sending>,
    workers: JoinSet<()>,
    maintenance: tokio::time::Interval,
    halted: watch::Receiver<bool>,
}

impl SendStrategy {
    pub(crate) fn new(sending: Arc<Sending>) -> Self {
        let mut maintenance = tokio::time::interval(MAINTENANCE_INTERVAL);
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        SendStrategy {
            halted: sending.halted.subscribe(),
            sending,
            workers: JoinSet::new(),
            maintenance,
        }
    }

    fn enqueue(&mut self, job: Job) {
        let recipient = job.outbox.recipient.clone();
        let spawn_worker = {
            let mut queues = self.sending.queues.lock().expect("queues");
            match queues.get_mut(&recipient) {
                Some(queue) => {
                    queue.push_back(job);
                    false
                }
                None => {
                    queues.insert(recipient.clone(), VecDeque::from([job]));
                    true
                }
            }
        };
        if spawn_worker {
            self.workers
                .spawn(recipient_worker(self.sending.clone(), recipient));
        } else {
            self.sending.arrivals.notify_waiters();
        }
    }
}

impl Strategy for SendStrategy {
    async fn assigned(&mut self, partitions: &[TopicPartition]) -> Result<(), StageFailure> {
        let sending = &self.sending;
        let numbers: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
        let restored = gridtalk_kafka::changelog::restore_for_stage(
            &sending.config.kafka,
            "send_index",
            &sending.config.topics.send_index,
            numbers,
        )
        .await
        .map_err(|e| StageFailure(format!("sent index of {partitions:?}: {e}")))?;
        let mut index = sending.index.lock().expect("index");
        let now_ms = chrono::Utc::now().timestamp_millis();
        let since_ms = now_ms.saturating_sub(sending.pair_memory_ms());
        for (p, entries) in restored {
            index.restored(p, entries);
            let in_doubt = index.in_doubt_of(p);
            if let (Some(resolver), Some(earliest)) = (
                &sending.in_doubt,
                in_doubt.iter().map(|send| send.sent_at_ms).min(),
            ) {
                tracing::info!(
                    partition = p,
                    messages = in_doubt.len(),
                    "sends in doubt (their requests were on the wire when the previous owner stopped); looking for their statuses before sending them again"
                );
                resolver.expect(earliest);
            }
            // The pair limit follows the partition: the previous owner's recent sends count as
            // if this process had made them.
            sending.limits.seed_pair_history(
                &index.sends_since(p, since_ms),
                now_ms,
                Duration::from_millis(sending.config.send.request_timeout_ms),
            );
        }
        Ok(())
    }

    fn revoked(&mut self, partitions: &[TopicPartition]) {
        let numbers: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
        {
            let mut index = self.sending.index.lock().expect("index");
            for p in &numbers {
                index.drop_partition(*p);
            }
        }
        // Queued messages of the partitions are left to their new owner. A worker whose queue
        // empties ends by itself.
        let mut dropped = 0;
        for queue in self.sending.queues.lock().expect("queues").values_mut() {
            let before = queue.len();
            queue.retain(|job| !numbers.contains(&job.message.partition()));
            dropped += before - queue.len();
        }
        for _ in 0..dropped {
            self.sending.done();
        }
    }

    fn submit(&mut self, record: Record) -> Submit {
        let sending = &self.sending;
        let pending = sending.pending.load(Ordering::Acquire);
        // While halted, one message is kept to probe with; the rest stay on the topic.
        if pending >= sending.config.send.max_queued.max(1)
            || (*self.halted.borrow() && pending > 0)
        {
            return Submit::PushBack(record);
        }
        let Record { message, ticket } = record;
        let outbox = match message.payload().map(OutboxMessage::from_avro) {
            Some(Ok(mut o)) => {
                o.fallback_request_json = fallback_of(&message);
                o
            }
            other => {
                let detail = match other {
                    Some(Err(e)) => e.to_string(),
                    _ => "outbox record has no value".into(),
                };
                let sending = sending.clone();
                sending.pending.fetch_add(1, Ordering::AcqRel);
                self.workers.spawn(async move {
                    if let Some(_effect) = ticket.begin_effect() {
                        dead_letter_job(
                            &sending,
                            &message,
                            ticket,
                            DeadLetterReason::MalformedOutbox,
                            &detail,
                            &[],
                        )
                        .await;
                    }
                    sending.done();
                });
                return Submit::Accepted;
            }
        };
        let informational = sending
            .coalescing
            .as_ref()
            .is_some_and(|c| c.is_informational(&outbox));
        let job = Job {
            message,
            outbox,
            ticket,
            informational,
        };
        if let Some(job) = sending.still_to_send(job) {
            sending.pending.fetch_add(1, Ordering::AcqRel);
            self.enqueue(job);
        }
        Submit::Accepted
    }

    async fn poll(&mut self) -> Result<(), StageFailure> {
        tokio::select! {
            Some(ended) = self.workers.join_next() => match ended {
                Err(e) if e.is_panic() => Err(StageFailure(format!("a send worker panicked: {e}"))),
                _ => Ok(()),
            },
            _ = self.sending.room.notified() => Ok(()),
            // A halt lifted: held records may be offered again.
            Ok(()) = self.halted.changed() => Ok(()),
            _ = self.maintenance.tick() => {
                sweep_index(&self.sending);
                self.sending.limits.shrink();
                if let Some(c) = &self.sending.coalescing {
                    let window = c.window;
                    self.sending
                        .last_informational
                        .lock()
                        .expect("windows")
                        .retain(|_, at| at.elapsed() < window);
                }
                Ok(())
            }
        }
    }
}

/// Deletes expired sent-index entries, in memory and (with tombstones) in the changelog.
fn sweep_index(sending: &Sending) {
    let (expired, live) = {
        let mut index = sending.index.lock().expect("index");
        let expired = index.expire(chrono::Utc::now().timestamp_millis());
        (expired, index.len())
    };
    Metrics::global()
        .state_entries
        .with_label_values(&["send_index"])
        .set(live as i64);
    for (partition, message_id) in expired {
        if let Err(e) = gridtalk_kafka::changelog::write(
            &sending.producer,
            &sending.config.topics.send_index,
            partition,
            &message_id,
            None,
        ) {
            tracing::warn!(error = %e, "sent-index tombstone not written; compaction keeps the entry until the next one");
        }
    }
}

/// Sends a recipient's queued messages one at a time, in order, until the queue is empty. With
/// coalescing, an informational message at the head of the queue takes the informational
/// messages queued behind it into one digest, and one that comes up within the window after the
/// recipient's previous informational message first waits for the window's end (gathering what
/// arrives meanwhile).
async fn recipient_worker(sending: Arc<Sending>, recipient: String) {
    while let Some(job) = next_job(&sending, &recipient) {
        let members = match &sending.coalescing {
            Some(c) if job.informational => {
                let previous = sending
                    .last_informational
                    .lock()
                    .expect("windows")
                    .get(&recipient)
                    .copied();
                if let Some(previous) = previous {
                    let window_ends = previous + c.window;
                    if window_ends > Instant::now() {
                        let waited = Instant::now();
                        hold_for_window(&sending, &recipient, &job, window_ends).await;
                        Metrics::global()
                            .rate_limit_wait_seconds
                            .with_label_values(&["coalesce"])
                            .observe(waited.elapsed().as_secs_f64());
                    }
                }
                gather(&sending, &recipient, c, job)
            }
            _ => vec![job],
        };
        let count = members.len();
        send_members(&sending, members).await;
        for _ in 0..count {
            sending.done();
        }
    }
}

/// The recipient's next queued message; `None` (and the worker's entry removed) when none is left.
fn next_job(sending: &Sending, recipient: &str) -> Option<Job> {
    let mut queues = sending.queues.lock().expect("queues");
    let queue = queues.get_mut(recipient)?;
    let job = queue.pop_front();
    if job.is_none() {
        queues.remove(recipient);
    }
    job
}

/// `first` and the informational messages queued behind it from the same number, up to
/// `max_items`, in outbox order. A message that stays in line (it asks for an answer, or comes
/// from another number) is passed over, but nothing about its document is taken past it: no
/// message is moved ahead of an earlier one about the same document.
fn gather(sending: &Sending, recipient: &str, c: &Coalescing, first: Job) -> Vec<Job> {
    let mut members = vec![first];
    let mut queues = sending.queues.lock().expect("queues");
    let Some(queue) = queues.get_mut(recipient) else {
        return members;
    };
    let mut passed: HashSet<String> = HashSet::new();
    let mut i = 0;
    while i < queue.len() && members.len() < c.max_items {
        let next = &queue[i];
        if next.informational
            && next.outbox.phone_number_id == members[0].outbox.phone_number_id
            && !passed.contains(&next.outbox.document_key)
        {
            members.push(queue.remove(i).expect("in range"));
        } else {
            passed.insert(next.outbox.document_key.clone());
            i += 1;
        }
    }
    members
}

/// Holds `head` (an informational message) until the window ends or its partition moves. A
/// request queued meanwhile does not wait for the digest: the first message in line that asks
/// for an answer goes at once, unless an informational message ahead of it is about the same
/// document (then it keeps its place behind the digest).
async fn hold_for_window(sending: &Sending, recipient: &str, head: &Job, window_ends: Instant) {
    loop {
        let arrived = sending.arrivals.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        if let Some(request) = request_ahead(sending, recipient, head) {
            send_members(sending, vec![request]).await;
            sending.done();
            continue;
        }
        let now = Instant::now();
        if now >= window_ends || !head.ticket.owned() {
            return;
        }
        // Woken by a new message, or at least every second to see whether the partition moved.
        let _ = tokio::time::timeout((window_ends - now).min(HALT_OWNERSHIP_CHECK), arrived).await;
    }
}

/// The first queued message of `recipient` that asks for an answer, taken out of the queue, if
/// no informational message ahead of it (the held `head` included) is about its document.
fn request_ahead(sending: &Sending, recipient: &str, head: &Job) -> Option<Job> {
    let mut queues = sending.queues.lock().expect("queues");
    let queue = queues.get_mut(recipient)?;
    let mut held_documents: HashSet<&str> = HashSet::from([head.outbox.document_key.as_str()]);
    let mut position = None;
    for (i, job) in queue.iter().enumerate() {
        if job.informational {
            held_documents.insert(&job.outbox.document_key);
        } else {
            if !held_documents.contains(job.outbox.document_key.as_str()) {
                position = Some(i);
            }
            break;
        }
    }
    queue.remove(position?)
}

/// Sends `members` (one message, or several as one digest). A digest WhatsApp refuses for good
/// (the digest template missing, paused or rejected) is not dead-lettered: its messages go one
/// by one, as they would without coalescing.
async fn send_members(sending: &Sending, members: Vec<Job>) {
    if let Some(refused) = send_once(sending, members).await {
        Metrics::global()
            .coalesced
            .with_label_values(&["refused"])
            .inc();
        tracing::warn!(
            messages = refused.len(),
            template = sending.config.send.coalesce.template,
            "WhatsApp refused the digest; its messages go one by one"
        );
        for job in refused {
            send_once(sending, vec![job]).await;
        }
    }
}

/// The Cloud API request for `members`: the message itself, or the digest of several.
fn request_for(sending: &Sending, members: &[Job]) -> String {
    match (&sending.coalescing, members) {
        (_, [only]) => only.outbox.request_json.clone(),
        (Some(c), _) => {
            let outboxes: Vec<&OutboxMessage> = members.iter().map(|m| &m.outbox).collect();
            c.digest_request(&outboxes).to_string()
        }
        (None, _) => unreachable!("several members only with coalescing"),
    }
}

/// Sends `members` as one request until it is accepted, dead-lettered, or their partition moves.
/// Returns the members of a digest WhatsApp refused for good.
async fn send_once(sending: &Sending, members: Vec<Job>) -> Option<Vec<Job>> {
    let metrics = Metrics::global();
    // Checked again now, not only when the record arrived: a partition revoked and assigned
    // back re-delivers records whose first copy may be queued ahead of this one and sent since.
    let members: Vec<Job> = members
        .into_iter()
        .filter_map(|job| sending.still_to_send(job))
        .collect();
    if members.is_empty() {
        return None;
    }
    if let [only] = members.as_slice() {
        if only.outbox.event_type == gridtalk_contract::READ_MARK_EVENT_TYPE {
            mark_read(sending, members.into_iter().next().expect("one")).await;
            return None;
        }
    }
    // A request an earlier life (or owner) may have made: looked for among the statuses before
    // it is made again.
    let mut members = resolve_earlier_intents(sending, members).await?;
    if members.is_empty() {
        return None;
    }
    let recipient = members[0].outbox.recipient.clone();
    // Free-form outside the recipient's window: WhatsApp would refuse it (131047), its
    // template goes instead.
    if let [only] = members.as_mut_slice() {
        let closed = sending
            .windows
            .is_open(&recipient, chrono::Utc::now().timestamp_millis())
            == Some(false);
        if closed && only.outbox.template_name.is_none() && use_fallback(only) {
            Metrics::global()
                .sends
                .with_label_values(&["template_fallback", "window_closed"])
                .inc();
        }
    }
    // A template Meta paused or disabled: not tried; dead-lettered to replay once approved.
    if let Some((name, status)) = members[0].outbox.template_name.clone().and_then(|name| {
        sending
            .windows
            .stopped_template(&name, &members[0].outbox.language)
            .map(|status| (name, status))
    }) {
        if members.len() > 1 {
            return Some(members);
        }
        let job = members.pop().expect("one member");
        let _effect = job.ticket.begin_effect()?;
        dead_letter_paused(sending, job, &name, &status).await;
        return None;
    }
    // Meta echoes it in the statuses of the message it accepts. Its first message's id and when
    // this request was first made: unique to the request (a digest that loses a member keeps
    // it), never the same as an earlier request's of the same message.
    let callback = format!(
        "{}@{}",
        members[0].outbox.message_id,
        chrono::Utc::now().timestamp_millis()
    );
    let mut request = with_callback(&request_for(sending, &members), &callback);
    // When this life recorded the intent (`None`: not yet, or intents are off).
    let mut intent_at: Option<i64> = None;
    let mut attempt: u32 = 0;
    let mut recipient_attempt: u32 = 0;
    // Attempts without an answer from Meta (see `RetryScope::Unanswered`).
    let mut unanswered: u32 = 0;
    loop {
        if !wait_out_halt(sending, &members[0].ticket).await {
            return None;
        }
        sending.limits.until_ready(&recipient).await;
        // Only now a place on the wire: the waits above held none.
        let Ok(permit) = sending.on_the_wire.acquire().await else {
            return None;
        };
        let mut wire = Some(permit);
        // The waits may have outlasted the assignment: once the partition moved, its new owner
        // sends these messages (and counts the recipient's pair limit).
        let mut effects = Vec::with_capacity(members.len());
        for job in &members {
            match job.ticket.begin_effect() {
                Some(effect) => effects.push(effect),
                None => {
                    tracing::debug!(
                        "partition revoked while waiting; message left to its new owner"
                    );
                    return None;
                }
            }
        }
        // Sent by an earlier copy of a record meanwhile.
        let before = members.len();
        let (sent, unsent): (Vec<Job>, Vec<Job>) = {
            let index = sending.index.lock().expect("index");
            members.into_iter().partition(|job| {
                index
                    .accepted(job.message.partition(), &job.outbox.message_id)
                    .is_some()
            })
        };
        for job in sent {
            job.ticket.finish();
        }
        members = unsent;
        if members.is_empty() {
            return None;
        }
        if members.len() != before {
            request = with_callback(&request_for(sending, &members), &callback);
        }
        // The intent first: from here on the request may reach WhatsApp, and a crash before
        // its outcome is recorded leaves the next owner something to look for.
        if sending.in_doubt.is_some() && intent_at.is_none() {
            match write_intents(sending, &members, &callback).await {
                Ok(at) => intent_at = Some(at),
                Err(e) => {
                    for job in members {
                        job.ticket.fail(format!("sent index intent: {e}"));
                    }
                    return None;
                }
            }
        }
        sending.report_on_the_wire();
        let token = sending.token.read().expect("token").clone();
        let started = Instant::now();
        let sent_at_ms = chrono::Utc::now().timestamp_millis();
        let result = sending.client.send(&token, &request).await;
        attempt += 1;
        match result {
            Ok(accepted) => {
                metrics
                    .send_request_seconds
                    .with_label_values(&["accepted"])
                    .observe(started.elapsed().as_secs_f64());
                metrics.sends.with_label_values(&["accepted", "none"]).inc();
                // Only a real change wakes the driver (a resume lets held records in again).
                if sending
                    .halted
                    .send_if_modified(|halted| std::mem::replace(halted, false))
                {
                    metrics.sender_halted.set(0);
                    sending.room.notify_one();
                    tracing::warn!(phone_number_id = %members[0].outbox.phone_number_id, "sending resumed");
                }
                record_accepted(sending, members, &accepted, (attempt, sent_at_ms)).await;
                drop(effects);
                return None;
            }
            Err(error) => {
                let mut class = error.class();
                let code = error.label();
                metrics
                    .send_request_seconds
                    .with_label_values(&["error"])
                    .observe(started.elapsed().as_secs_f64());
                metrics.send_errors.with_label_values(&[&code]).inc();
                // Outside the window after all (Meta's view can differ from the webhooks'):
                // the template goes now, as the next attempt.
                if error.code() == Some(131047) {
                    if let [only] = members.as_mut_slice() {
                        if use_fallback(only) {
                            metrics
                                .sends
                                .with_label_values(&["template_fallback", "131047"])
                                .inc();
                            request = with_callback(&request_for(sending, &members), &callback);
                            drop(effects);
                            drop(wire.take());
                            sending.report_on_the_wire();
                            continue;
                        }
                    }
                }
                // No answer to a request that may have reached WhatsApp: its statuses say
                // whether it did, before it is made again.
                if let (true, Some(in_doubt), Some(at)) =
                    (error.in_doubt(), &sending.in_doubt, intent_at)
                {
                    drop(wire.take());
                    sending.report_on_the_wire();
                    let resolved = in_doubt
                        .resolve(&callback, at, || members[0].ticket.owned())
                        .await;
                    if let Some(resolved) = resolved {
                        metrics
                            .sends
                            .with_label_values(&["in_doubt_resolved", "none"])
                            .inc_by(members.len() as u64);
                        record_accepted(sending, members, &accepted_as(resolved), (attempt, at))
                            .await;
                        drop(effects);
                        return None;
                    }
                    if !members[0].ticket.owned() {
                        return None;
                    }
                    metrics
                        .sends
                        .with_label_values(&["in_doubt_resent", "none"])
                        .inc_by(members.len() as u64);
                }
                if class == ErrorClass::Retry(RetryScope::Unanswered) {
                    unanswered += 1;
                    if unanswered >= sending.config.send.max_unanswered_attempts.max(1) {
                        // Meta always answers with its error body: a run of silence or of
                        // foreign answers means the way to Meta is broken, for every message.
                        class = ErrorClass::HaltSender;
                    }
                }
                let wait = match class {
                    ErrorClass::Retry(RetryScope::Number | RetryScope::Unanswered) => {
                        sending.backoff(attempt - 1)
                    }
                    ErrorClass::Retry(RetryScope::Recipient) => {
                        // Meta's advice for the pair limit: 4^x seconds, only for this recipient.
                        recipient_attempt += 1;
                        Duration::from_secs(4u64.pow(recipient_attempt.min(4) - 1)).min(
                            Duration::from_millis(sending.config.send.retry_max_backoff_ms),
                        )
                    }
                    ErrorClass::Retry(RetryScope::Limited)
                        if attempt < sending.config.send.max_unknown_error_attempts =>
                    {
                        sending.backoff(attempt - 1)
                    }
                    ErrorClass::TemplatePaused => {
                        if let Some(name) = &members[0].outbox.template_name {
                            sending.windows.template_status(
                                name,
                                &members[0].outbox.language,
                                if code == "132016" {
                                    "DISABLED"
                                } else {
                                    "PAUSED"
                                },
                            );
                        }
                        if members.len() > 1 {
                            return Some(members);
                        }
                        let job = members.pop().expect("one member");
                        let name = job.outbox.template_name.clone().unwrap_or_default();
                        dead_letter_paused(sending, job, &name, &error.to_string()).await;
                        drop(effects);
                        return None;
                    }
                    ErrorClass::Retry(RetryScope::Limited)
                    | ErrorClass::Permanent
                    | ErrorClass::RetryAfterDay
                        if members.len() > 1 =>
                    {
                        tracing::debug!(code = %code, error = %error, "digest refused");
                        return Some(members);
                    }
                    ErrorClass::Retry(RetryScope::Limited)
                    | ErrorClass::Permanent
                    | ErrorClass::RetryAfterDay => {
                        metrics
                            .sends
                            .with_label_values(&["dead_letter", class.label()])
                            .inc();
                        let not_before = (chrono::Utc::now() + chrono::Duration::hours(24))
                            .timestamp_millis()
                            .to_string();
                        let (reason, extra): (_, Vec<(&str, &str)>) = match class {
                            ErrorClass::Permanent => (
                                DeadLetterReason::WhatsappPermanent,
                                vec![("whatsapp_code", &code)],
                            ),
                            ErrorClass::RetryAfterDay => (
                                DeadLetterReason::WhatsappRetryLater,
                                vec![("whatsapp_code", &code), ("retry_not_before", &not_before)],
                            ),
                            _ => (
                                DeadLetterReason::WhatsappRetriesExhausted,
                                vec![("whatsapp_code", &code)],
                            ),
                        };
                        let job = members.pop().expect("one member");
                        dead_letter_job(
                            sending,
                            &job.message,
                            job.ticket,
                            reason,
                            &error.to_string(),
                            &extra,
                        )
                        .await;
                        drop(effects);
                        return None;
                    }
                    ErrorClass::HaltSender => {
                        metrics
                            .sends
                            .with_label_values(&["halt", class.label()])
                            .inc();
                        if sending
                            .halted
                            .send_if_modified(|halted| !std::mem::replace(halted, true))
                        {
                            metrics.sender_halted.set(1);
                            tracing::error!(code = %code, error = %error, phone_number_id = %members[0].outbox.phone_number_id, "sending halted for the number: operator action needed (token, account, policy, or the way to Meta); messages are kept");
                        }
                        Duration::ZERO
                    }
                };
                // The wait holds neither a place on the wire nor the partition's drain.
                drop(effects);
                drop(wire.take());
                sending.report_on_the_wire();
                if class != ErrorClass::HaltSender {
                    metrics
                        .sends
                        .with_label_values(&["retry", class.label()])
                        .inc();
                    tracing::debug!(code = %code, attempt, wait_ms = wait.as_millis() as u64, to = %mask_phone(&recipient), "send will be retried");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// WhatsApp accepted the request for `members`: each gets its sent-log record (the same wamid
/// for every message of a digest) and then its sent-index entry, both acknowledged before its
/// outbox offset may move.
async fn record_accepted(
    sending: &Sending,
    members: Vec<Job>,
    accepted: &gridtalk_whatsapp::Accepted,
    (attempt, sent_at_ms): (u32, i64),
) {
    let metrics = Metrics::global();
    let digest = members.len() > 1;
    let accepted_at = chrono::Utc::now().timestamp_millis();
    // Meta names the person a message went to (`contacts[].wa_id`); a group send names nobody,
    // and its statuses carry the group id the message was sent to.
    let wa_id = if accepted.wa_id.is_empty() {
        members[0].outbox.recipient.clone()
    } else {
        accepted.wa_id.clone()
    };
    let records: Vec<Vec<u8>> = members
        .iter()
        .map(|job| {
            let outbox = &job.outbox;
            SentMessage {
                wamid: accepted.wamid.clone(),
                message_id: outbox.message_id.clone(),
                event_id: outbox.event_id.clone(),
                event_type: outbox.event_type.clone(),
                correlation_id: outbox.correlation_id.clone(),
                document_key: outbox.document_key.clone(),
                partner_id: outbox.partner_id.clone(),
                phone_number_id: outbox.phone_number_id.clone(),
                contact_id: outbox.contact_id.clone(),
                recipient: outbox.recipient.clone(),
                wa_id: wa_id.clone(),
                template_name: if digest {
                    Some(sending.config.send.coalesce.template.clone())
                } else {
                    outbox.template_name.clone()
                },
                message_status: accepted.message_status.clone(),
                attempts: attempt as i32,
                accepted_at,
            }
            .to_avro()
        })
        .collect();
    let logged = futures::future::join_all(records.iter().map(|bytes| {
        sending.producer.send(
            FutureRecord::to(&sending.config.topics.sent)
                // Keyed by the WhatsApp id Meta resolved the recipient to: webhooks name the
                // contact by that id, so replies and statuses land on the same partition number.
                .key(wa_id.as_bytes())
                .payload(bytes),
            sending.timeout(),
        )
    }))
    .await;
    if let Some(Err((e, _))) = logged.into_iter().find(Result::is_err) {
        for job in members {
            job.ticket.fail(format!("sent log: {e}"));
        }
        return;
    }
    // Then the sent index, before the outbox offset may move: a replay of these records finds
    // them and is not sent again.
    let indexed_send = IndexedSend {
        wamid: accepted.wamid.clone(),
        recipient: members[0].outbox.recipient.clone(),
        sent_at_ms,
        // The outcome replaces the intent; its callback is no longer looked for.
        callback: String::new(),
    };
    if let Err(e) = index_jobs(sending, &members, &indexed_send, accepted_at).await {
        for job in members {
            job.ticket.fail(format!("sent index: {e}"));
        }
        return;
    }
    if members[0].informational {
        sending
            .last_informational
            .lock()
            .expect("windows")
            .insert(members[0].outbox.recipient.clone(), Instant::now());
    }
    if digest {
        metrics
            .coalesced
            .with_label_values(&["merged"])
            .inc_by(members.len() as u64);
        metrics.coalesced.with_label_values(&["digest"]).inc();
    }
    for job in members {
        let outbox = &job.outbox;
        let age = (accepted_at - outbox.created_at).max(0) as f64 / 1000.0;
        metrics
            .end_to_end_seconds
            .with_label_values(&[&outbox.event_type])
            .observe(age);
        tracing::debug!(wamid = %gridtalk_telemetry::mask_wamid(&accepted.wamid), to = %mask_phone(&outbox.recipient), template = outbox.template_name.as_deref().unwrap_or("-"), event_id = %outbox.event_id, attempts = attempt, digest, "message accepted by WhatsApp");
        job.ticket.finish();
    }
}

/// Dead-letters a message whose template Meta paused or disabled (`status`: what Meta said).
async fn dead_letter_paused(sending: &Sending, job: Job, template: &str, status: &str) {
    Metrics::global()
        .sends
        .with_label_values(&["dead_letter", "template_paused"])
        .inc();
    dead_letter_job(
        sending,
        &job.message,
        job.ticket,
        DeadLetterReason::TemplatePaused,
        &format!(
            "template {template} ({}) is not sendable at WhatsApp: {status}; replay with `gridtalk dlq replay --reason template_paused` once Meta approves it again",
            job.outbox.language
        ),
        &[("template", template)],
    )
    .await;
}

/// Marks a person's message read with the typing indicator (the confirmation queued behind it
/// in the recipient's line ends the indicator). Best effort, one attempt: a failure costs the
/// person two blue ticks, not their confirmation, which goes all the same. Recorded in the sent
/// index like a send, so a replayed record does not show the indicator again.
async fn mark_read(sending: &Sending, job: Job) {
    let metrics = Metrics::global();
    if !wait_out_halt(sending, &job.ticket).await {
        return;
    }
    sending.limits.until_throughput().await;
    let Ok(_wire) = sending.on_the_wire.acquire().await else {
        return;
    };
    let Some(effect) = job.ticket.begin_effect() else {
        return;
    };
    let token = sending.token.read().expect("token").clone();
    let outcome = match sending
        .client
        .mark_read(&token, &job.outbox.request_json)
        .await
    {
        Ok(()) => "read_marked",
        Err(e) => {
            metrics.send_errors.with_label_values(&[&e.label()]).inc();
            tracing::debug!(error = %e, "marking a message read failed; the confirmation goes all the same");
            "read_mark_failed"
        }
    };
    metrics.sends.with_label_values(&[outcome, "none"]).inc();
    let at = chrono::Utc::now().timestamp_millis();
    let mark = IndexedSend {
        wamid: "read".into(),
        // No recipient: a read mark does not count for the pair limit.
        recipient: String::new(),
        sent_at_ms: at,
        callback: String::new(),
    };
    match index_jobs(sending, std::slice::from_ref(&job), &mark, at).await {
        Ok(()) => job.ticket.finish(),
        Err(e) => job.ticket.fail(format!("sent index: {e}")),
    }
    drop(effect);
}

/// The template request a free-form outbox record carries for a closed window.
fn fallback_of(message: &OwnedMessage) -> Option<String> {
    use rdkafka::message::Headers;
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == gridtalk_contract::FALLBACK_HEADER)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(String::from)
}

/// Replaces a free-form message by the template it carries, once; false when it has none.
fn use_fallback(job: &mut Job) -> bool {
    let Some(fallback) = job.outbox.fallback_request_json.take() else {
        return false;
    };
    let template = serde_json::from_str::<serde_json::Value>(&fallback)
        .ok()
        .and_then(|v| v.pointer("/template/name")?.as_str().map(String::from));
    tracing::debug!(
        to = %mask_phone(&job.outbox.recipient),
        template = template.as_deref().unwrap_or("-"),
        "outside the customer-service window: the message goes as its template"
    );
    job.outbox.template_name = template;
    job.outbox.request_json = fallback;
    true
}

/// What WhatsApp accepted, as a status of the message told it.
fn accepted_as(resolved: Resolved) -> gridtalk_whatsapp::Accepted {
    gridtalk_whatsapp::Accepted {
        wamid: resolved.wamid,
        wa_id: resolved.wa_id,
        message_status: "accepted".into(),
    }
}

/// Writes `entry` on the sent-index key of each of `jobs` (the changelog partition of its outbox
/// partition), kept `send.index_retention_hours` from `at_ms`; once every write is acknowledged,
/// holds it in memory too.
async fn index_jobs(
    sending: &Sending,
    jobs: &[Job],
    entry: &IndexedSend,
    at_ms: i64,
) -> Result<(), String> {
    let expires =
        at_ms + (sending.config.send.index_retention_hours as i64).saturating_mul(3_600_000);
    let encoded = entry.encode();
    let mut deliveries = Vec::with_capacity(jobs.len());
    for job in jobs {
        deliveries.push(
            gridtalk_kafka::changelog::write(
                &sending.producer,
                &sending.config.topics.send_index,
                job.message.partition(),
                &job.outbox.message_id,
                Some((&encoded, expires)),
            )
            .map_err(|e| e.to_string())?,
        );
    }
    gridtalk_kafka::acknowledged(deliveries).await?;
    let mut index = sending.index.lock().expect("index");
    for job in jobs {
        index.record(
            job.message.partition(),
            &job.outbox.message_id,
            entry,
            expires,
        );
    }
    Ok(())
}

/// Records that the request for `members` (carrying `callback`) is about to go out, on each
/// member's sent-index key, acknowledged; returns the time it records.
async fn write_intents(sending: &Sending, members: &[Job], callback: &str) -> Result<i64, String> {
    let at = chrono::Utc::now().timestamp_millis();
    let intent = IndexedSend {
        wamid: String::new(),
        recipient: members[0].outbox.recipient.clone(),
        sent_at_ms: at,
        callback: callback.to_string(),
    };
    index_jobs(sending, members, &intent, at).await?;
    Ok(at)
}

/// `members` without those whose intent an earlier owner recorded and a status webhook shows
/// WhatsApp accepted (those are recorded as accepted here, not sent again). A message whose
/// intent no status answers within `send.in_doubt_wait_ms` stays, to be sent again. `None` when
/// the partition moved meanwhile.
async fn resolve_earlier_intents(sending: &Sending, members: Vec<Job>) -> Option<Vec<Job>> {
    let Some(in_doubt) = &sending.in_doubt else {
        return Some(members);
    };
    let intents: Vec<Option<IndexedSend>> = {
        let index = sending.index.lock().expect("index");
        members
            .iter()
            .map(|job| index.in_doubt(job.message.partition(), &job.outbox.message_id))
            .collect()
    };
    if intents.iter().all(Option::is_none) {
        return Some(members);
    }
    let metrics = Metrics::global();
    let mut remaining = Vec::with_capacity(members.len());
    // One request, one callback: the members of a digest are resolved together.
    let mut requests: Vec<(IndexedSend, Vec<Job>)> = Vec::new();
    for (job, intent) in members.into_iter().zip(intents) {
        match intent {
            Some(intent) if !intent.callback.is_empty() => {
                match requests
                    .iter_mut()
                    .find(|(known, _)| known.callback == intent.callback)
                {
                    Some((_, jobs)) => jobs.push(job),
                    None => requests.push((intent, vec![job])),
                }
            }
            _ => remaining.push(job),
        }
    }
    for (intent, jobs) in requests {
        let waited = Instant::now();
        let resolved = in_doubt
            .resolve(&intent.callback, intent.sent_at_ms, || {
                jobs.iter().all(|job| job.ticket.owned())
            })
            .await;
        tracing::debug!(
            messages = jobs.len(),
            resolved = resolved.is_some(),
            waited_ms = waited.elapsed().as_millis() as u64,
            "send in doubt looked for among the statuses"
        );
        let Some(resolved) = resolved else {
            if !jobs.iter().all(|job| job.ticket.owned()) {
                return None;
            }
            metrics
                .sends
                .with_label_values(&["in_doubt_resent", "none"])
                .inc_by(jobs.len() as u64);
            remaining.extend(jobs);
            continue;
        };
        let mut effects = Vec::with_capacity(jobs.len());
        for job in &jobs {
            effects.push(job.ticket.begin_effect()?);
        }
        metrics
            .sends
            .with_label_values(&["in_doubt_resolved", "none"])
            .inc_by(jobs.len() as u64);
        record_accepted(
            sending,
            jobs,
            &accepted_as(resolved),
            (1, intent.sent_at_ms),
        )
        .await;
        drop(effects);
    }
    // In outbox order again (a digest's members were taken out together).
    remaining.sort_by_key(|job| (job.message.partition(), job.message.offset()));
    Some(remaining)
}

async fn dead_letter_job(
    sending: &Sending,
    message: &OwnedMessage,
    ticket: Ticket,
    reason: DeadLetterReason,
    detail: &str,
    extra: &[(&str, &str)],
) {
    match dead_letter(
        &sending.producer,
        &sending.config.topics.dlq,
        STAGE,
        reason,
        detail,
        message,
        extra,
        sending.timeout(),
    )
    .await
    {
        Ok(()) => ticket.finish(),
        Err(e) => ticket.fail(format!("dead letter: {e}")),
    }
}

/// Waits while the number is halted. One waiting worker probes: it waits the probe interval,
/// re-reads the token and returns to try its message. False when the message's partition moved
/// meanwhile (the message is then left to the new owner).
async fn wait_out_halt(sending: &Sending, ticket: &Ticket) -> bool {
    while *sending.halted.borrow() {
        match sending.prober.try_lock() {
            Ok(_probe) => {
                let probe_at = Instant::now()
                    + Duration::from_millis(sending.config.send.halt_probe_interval_ms);
                while Instant::now() < probe_at {
                    if !ticket.owned() {
                        return false;
                    }
                    tokio::time::sleep(HALT_OWNERSHIP_CHECK.min(probe_at - Instant::now())).await;
                }
                match sending.config.read_access_token() {
                    Ok(token) => *sending.token.write().expect("token") = token,
                    Err(e) => tracing::warn!(error = %e, "could not re-read the access token"),
                }
                return ticket.owned();
            }
            Err(_) => {
                let mut rx = sending.halted.subscribe();
                let _ = tokio::time::timeout(HALT_OWNERSHIP_CHECK, rx.wait_for(|h| !*h)).await;
                if !ticket.owned() {
                    return false;
                }
            }
        }
    }
    true
}
