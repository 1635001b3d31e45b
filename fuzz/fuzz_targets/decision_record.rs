//! Records on the decisions topic that are not decision candidates (clock commands: open, close,
//! upstream, defer), the decide stage's changelog entries for clocks and waiting messages, and a
//! summary tally's changelog value, as anyone who can write to those topics can send them.
//!
//! The first byte picks a mode. A record must parse to a command or an error, never panic; a
//! command must read back from what it writes; applied to the clocks, a step fires at most once
//! however far time runs. Any changelog entries must restore without a panic, and what restores
//! must fire each step at most once. Any text as a tally must give a tally or an error.
#![no_main]

use std::collections::HashSet;

use gridtalk_clock::{ClockCommand, Clocks, Deferred};
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_800_000_000_000;
const FAR: i64 = i64::MAX / 4;

/// Takes every due step far in the future; no (key, step) twice.
fn drain(clocks: &mut Clocks) {
    let mut fired = HashSet::new();
    for _ in 0..256 {
        let Some(fire) = clocks.take_next_due(FAR) else {
            return;
        };
        assert!(
            fired.insert((fire.clock.key.clone(), fire.step)),
            "step {} of {} fired twice",
            fire.step,
            fire.clock.key
        );
    }
}

/// `key` 0x00 `value` pairs separated by 0x01.
fn entries(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == 1)
        .filter_map(|pair| {
            let i = pair.iter().position(|&b| b == 0)?;
            Some((
                String::from_utf8_lossy(&pair[..i]).into_owned(),
                String::from_utf8_lossy(&pair[i + 1..]).into_owned(),
            ))
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            let Some(Ok(command)) = ClockCommand::from_json(rest) else {
                return;
            };
            let again = ClockCommand::from_json(&command.to_json())
                .expect("still a clock command")
                .expect("reads back what it wrote");
            assert_eq!(again, command);
            let mut clocks = Clocks::new();
            match command {
                ClockCommand::Open(open) => {
                    let key = open.key.clone();
                    clocks.open(0, open.clone(), NOW);
                    // An Open replayed changes nothing that fired.
                    clocks.open(0, open, NOW);
                    let _ = clocks.upstream(&key, 1, NOW);
                    drain(&mut clocks);
                    clocks.close(0, &key, NOW);
                    assert!(clocks.take_next_due(FAR).is_none(), "a closed clock fired");
                }
                ClockCommand::Close { key, .. } => {
                    clocks.close(0, &key, NOW);
                }
                ClockCommand::Upstream { key, step, .. } => {
                    let _ = clocks.upstream(&key, step, NOW);
                }
                ClockCommand::Defer(message) => {
                    let mut deferred = Deferred::new();
                    deferred.hold(0, message.clone());
                    deferred.hold(0, message);
                    let _ = deferred.take_next_due(FAR);
                    assert!(deferred.take_next_due(FAR).is_none(), "released twice");
                }
            }
        }
        1 => {
            let mut clocks = Clocks::new();
            clocks.restore(0, entries(rest));
            drain(&mut clocks);
        }
        2 => {
            let mut deferred = Deferred::new();
            deferred.restore(0, entries(rest));
            while deferred.take_next_due(FAR).is_some() {}
        }
        _ => {
            if let Ok(tally) = gridtalk_summary::Tally::from_json(&String::from_utf8_lossy(rest)) {
                let _ = tally.counts();
                let mut tally = tally;
                let _ = tally.close_period(NOW);
            }
        }
    }
});
