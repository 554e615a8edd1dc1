//! Unit tests of the lease core with a virtual clock, and property tests against a reference
//! model that recomputes everything from scratch the naive way.

use std::collections::BTreeMap;

use event_log::event::{
    Beat, Event, HealthCheck, HeartbeatsReceived, InstanceDeregistered, InstanceRegistered,
    InstanceStatusChanged, InstanceTurnedHealthy, InstanceTurnedUnhealthy, Location,
    SelfPreservationExited, millis_to_datetime,
};
use event_log::{Envelope, Streams};
use proptest::prelude::*;

use super::*;

const T0: i64 = 1_800_000_000_000;

fn key(n: u8) -> InstanceKey {
    [n; 20]
}

fn envelope(id: &InstanceKey, at: i64, event: Event) -> Envelope {
    let mut envelope = Envelope::new("ns", "svc", format_instance_id(id), event);
    envelope.occurred_at = millis_to_datetime(at);
    envelope
}

fn registration(ttl_ms: Option<u64>, ephemeral: bool) -> Event {
    Event::InstanceRegistered(InstanceRegistered {
        host: "10.0.0.1".into(),
        port: 80,
        protocol: String::new(),
        version: String::new(),
        weight: Some(100),
        metadata: BTreeMap::new(),
        health_check: ttl_ms.map(|ttl_ms| HealthCheck { ttl_ms }),
        ephemeral,
        isolate: None,
        location: Location::default(),
    })
}

fn no_sp() -> Rules {
    Rules {
        unhealthy_ratio: 3.0,
        delete_timeout_ms: 500,
        self_preservation: None,
    }
}

fn sp_rules(min_at_risk: u64) -> Rules {
    Rules {
        unhealthy_ratio: 3.0,
        delete_timeout_ms: 500,
        self_preservation: Some(SelfPreservationRules {
            share: 1.0 / 3.0,
            window_ms: 1_000,
            min_at_risk,
        }),
    }
}

/// A table plus a simulated log: sequences, acknowledgements, and echoes of our own appends.
struct Harness {
    table: LeaseTable,
    sequence: u64,
    log: Vec<Transition>,
}

impl Harness {
    fn new(rules: Rules) -> Harness {
        let mut table = LeaseTable::new(rules);
        table.advance(T0);
        Harness {
            table,
            sequence: 0,
            log: Vec::new(),
        }
    }

    fn apply(&mut self, envelope: &Envelope) -> u64 {
        self.sequence += 1;
        self.table.apply(self.sequence, envelope).unwrap();
        self.publish();
        self.sequence
    }

    fn register(&mut self, n: u8, at: i64, ttl: u64, ephemeral: bool) -> u64 {
        self.apply(&envelope(&key(n), at, registration(Some(ttl), ephemeral)))
    }

    fn beat(&mut self, n: u8, at: i64) {
        self.table.heartbeat(&key(n), at);
        self.publish();
    }

    fn advance(&mut self, now: i64) -> Vec<Transition> {
        let before = self.log.len();
        self.table.advance(now);
        self.publish();
        self.log[before..].to_vec()
    }

    /// Acknowledges each decision with the next sequence and feeds its echo back, as the shell
    /// does by reading the stream.
    fn publish(&mut self) {
        for transition in self.table.take_transitions() {
            self.sequence += 1;
            self.table.acknowledged(&transition, self.sequence);
            self.table
                .apply(self.sequence, &transition.envelope())
                .unwrap();
            self.log.push(transition);
        }
    }

    fn state(&self, n: u8) -> Option<LeaseState> {
        self.table.lease(&key(n)).map(|lease| lease.state)
    }
}

fn kinds(transitions: &[Transition]) -> Vec<&'static str> {
    transitions
        .iter()
        .map(|t| match t.kind {
            TransitionKind::TurnedUnhealthy { .. } => "unhealthy",
            TransitionKind::TurnedHealthy { .. } => "healthy",
            TransitionKind::Expired { .. } => "expired",
            TransitionKind::SelfPreservationEntered { .. } => "sp-entered",
            TransitionKind::SelfPreservationExited { .. } => "sp-exited",
        })
        .collect()
}

#[test]
fn silence_turns_unhealthy_exactly_at_ratio_times_ttl() {
    let mut h = Harness::new(no_sp());
    let generation = h.register(1, T0, 100, false);
    assert_eq!(h.state(1), Some(LeaseState::Healthy));
    assert!(h.advance(T0 + 299).is_empty());
    assert_eq!(h.table.next_timer(), Some(T0 + 300));
    let fired = h.advance(T0 + 300);
    assert_eq!(fired.len(), 1);
    let TransitionKind::TurnedUnhealthy {
        instance,
        last_heartbeat_ms,
        deadline_ms,
    } = &fired[0].kind
    else {
        panic!("{fired:?}")
    };
    assert_eq!((*last_heartbeat_ms, *deadline_ms), (T0, T0 + 300));
    assert_eq!(instance.generation, generation);
    assert_eq!(instance.after_sequence, generation);
    assert_eq!(fired[0].at_ms, T0 + 300);
    assert_eq!(h.state(1), Some(LeaseState::Unhealthy));
    // Persistent: nothing more, ever.
    assert!(h.advance(T0 + 1_000_000).is_empty());
    assert_eq!(h.table.next_timer(), None);
}

#[test]
fn deadlines_run_from_the_recorded_beat_time_not_the_read_time() {
    let mut h = Harness::new(no_sp());
    h.register(1, T0, 100, false);
    h.advance(T0 + 250);
    // Read late (at T0 + 250) but recorded at T0 + 50: deadline T0 + 350, not T0 + 550.
    h.beat(1, T0 + 50);
    assert!(h.advance(T0 + 349).is_empty());
    assert_eq!(kinds(&h.advance(T0 + 350)), ["unhealthy"]);
    // An older beat read even later changes nothing.
    h.beat(1, T0 + 40);
    assert_eq!(h.state(1), Some(LeaseState::Unhealthy));
}

#[test]
fn live_beats_revive_and_stale_beats_do_not() {
    let mut h = Harness::new(no_sp());
    h.register(1, T0, 100, false);
    h.advance(T0 + 300);
    h.advance(T0 + 1000);
    // Recorded at T0 + 600: its window ended at T0 + 900, so it proves nothing now.
    h.beat(1, T0 + 600);
    assert_eq!(h.state(1), Some(LeaseState::Unhealthy));
    h.beat(1, T0 + 990);
    let revived = &h.log[h.log.len() - 1];
    assert_eq!(kinds(std::slice::from_ref(revived)), ["healthy"]);
    assert!(matches!(
        revived.kind,
        TransitionKind::TurnedHealthy { heartbeat_ms, .. } if heartbeat_ms == T0 + 990
    ));
    assert_eq!(h.state(1), Some(LeaseState::Healthy));
    assert_eq!(kinds(&h.advance(T0 + 1290)), ["unhealthy"]);
    // Two unhealthy cycles in one generation have distinct ids.
    let ids: Vec<String> = h.log.iter().map(Transition::event_id).collect();
    assert_eq!(ids.len(), 3);
    assert_ne!(ids[0], ids[2]);
    assert!(ids[0].ends_with(&format!(":unhealthy:{T0}")), "{}", ids[0]);
}

#[test]
fn ephemeral_leases_expire_after_the_delete_timeout_persistent_ones_never() {
    let mut h = Harness::new(no_sp());
    h.register(1, T0, 100, true);
    h.register(2, T0, 100, false);
    assert_eq!(kinds(&h.advance(T0 + 300)), ["unhealthy", "unhealthy"]);
    assert!(h.advance(T0 + 799).is_empty());
    let expired = h.advance(T0 + 800);
    assert_eq!(kinds(&expired), ["expired"]);
    assert!(matches!(
        expired[0].kind,
        TransitionKind::Expired { deadline_ms, .. } if deadline_ms == T0 + 800
    ));
    assert_eq!(h.state(1), None, "removed once acknowledged");
    assert_eq!(h.state(2), Some(LeaseState::Unhealthy));
    assert_eq!(h.table.len(), 1);
}

#[test]
fn a_late_advance_decides_unhealthy_and_expiry_together() {
    let mut h = Harness::new(no_sp());
    h.register(1, T0, 100, true);
    let fired = h.advance(T0 + 10_000);
    assert_eq!(kinds(&fired), ["unhealthy", "expired"]);
    assert!(fired.iter().all(|t| t.at_ms == T0 + 10_000));
}

#[test]
fn deregistration_removes_and_re_registration_starts_a_new_generation() {
    let mut h = Harness::new(no_sp());
    let first = h.register(1, T0, 100, false);
    h.advance(T0 + 300);
    assert_eq!(h.state(1), Some(LeaseState::Unhealthy));
    // Re-registration renews the lease and makes it healthy (per the fold): no TurnedHealthy.
    let second = h.register(1, T0 + 400, 100, false);
    assert!(second > first);
    assert_eq!(h.state(1), Some(LeaseState::Healthy));
    assert_eq!(kinds(&h.log), ["unhealthy"]);
    assert_eq!(h.table.lease(&key(1)).unwrap().generation, second);
    h.apply(&envelope(
        &key(1),
        T0 + 500,
        Event::InstanceDeregistered(InstanceDeregistered {}),
    ));
    assert_eq!(h.state(1), None);
    assert!(h.advance(T0 + 100_000).is_empty());
    // A beat for a removed instance is counted, not applied.
    h.beat(1, T0 + 100_000);
    assert_eq!(h.table.counts().unknown_beats, 1);
}

#[test]
fn disabled_health_checks_never_transition() {
    let mut h = Harness::new(no_sp());
    h.register(1, T0, 100, true);
    h.apply(&envelope(&key(1), T0 + 10, registration(None, true)));
    assert_eq!(h.state(1), None);
    h.apply(&envelope(&key(2), T0, registration(None, true)));
    assert!(h.advance(T0 + 1_000_000).is_empty());
    assert!(h.table.is_empty());
}

#[test]
fn facts_from_another_engine_are_applied_and_corrected() {
    let mut h = Harness::new(no_sp());
    let generation = h.register(1, T0, 100, false);
    h.beat(1, T0 + 200);
    h.advance(T0 + 310);
    // A lagging twin that never saw the beat at T0 + 200 publishes TurnedUnhealthy.
    let twin = InstanceTurnedUnhealthy {
        last_heartbeat_ms: Some(T0),
        deadline_ms: T0 + 300,
        generation,
    };
    h.apply(&envelope(
        &key(1),
        T0 + 310,
        Event::InstanceTurnedUnhealthy(twin),
    ));
    // We know a newer, live beat: we publish TurnedHealthy for it.
    assert_eq!(kinds(&h.log), ["healthy"]);
    assert_eq!(h.state(1), Some(LeaseState::Healthy));
    // A twin's TurnedUnhealthy based on the very beat we know changes our mind, no flapping.
    let same = InstanceTurnedUnhealthy {
        last_heartbeat_ms: Some(T0 + 200),
        deadline_ms: T0 + 500,
        generation,
    };
    h.apply(&envelope(
        &key(1),
        T0 + 320,
        Event::InstanceTurnedUnhealthy(same),
    ));
    assert_eq!(h.state(1), Some(LeaseState::Unhealthy));
    assert_eq!(kinds(&h.log), ["healthy"]);
    // And a twin's TurnedHealthy is taken as the beat it reports.
    h.apply(&envelope(
        &key(1),
        T0 + 330,
        Event::InstanceTurnedHealthy(InstanceTurnedHealthy {
            heartbeat_ms: T0 + 320,
            generation,
        }),
    ));
    assert_eq!(h.state(1), Some(LeaseState::Healthy));
    assert_eq!(h.table.lease(&key(1)).unwrap().deadline_ms, T0 + 620);
}

#[test]
fn echoes_and_redeliveries_change_nothing() {
    let mut h = Harness::new(no_sp());
    let sequence = h.register(1, T0, 100, false);
    h.advance(T0 + 300);
    let unhealthy = h.log[0].clone();
    let echo_sequence = h.sequence;
    // Redelivery of the registration and of our own transition: ignored by sequence.
    h.table
        .apply(
            sequence,
            &envelope(&key(1), T0, registration(Some(100), false)),
        )
        .unwrap();
    h.table.apply(echo_sequence, &unhealthy.envelope()).unwrap();
    h.publish();
    assert_eq!(h.state(1), Some(LeaseState::Unhealthy));
    assert_eq!(h.log.len(), 1);
    // A status change moves the expected sequence of the next transition.
    let change = h.apply(&envelope(
        &key(1),
        T0 + 400,
        Event::InstanceStatusChanged(InstanceStatusChanged::default()),
    ));
    h.beat(1, T0 + 400);
    let revived = h.log.last().unwrap();
    assert_eq!(revived.after_sequence(), change);
}

#[test]
fn transitions_become_deduplicable_appends_on_the_right_subject() {
    let mut h = Harness::new(no_sp());
    let generation = h.register(7, T0, 100, false);
    let fired = h.advance(T0 + 300);
    let streams = Streams::new("reg");
    let append = fired[0].append(&streams).unwrap();
    let id = format_instance_id(&key(7));
    assert_eq!(append.subject, format!("reg.evt.ns.svc.{id}"));
    assert_eq!(
        append.msg_id.as_deref(),
        Some(format!("health:{id}:{generation}:unhealthy:{T0}").as_str())
    );
    assert_eq!(append.expected_last_subject_sequence, Some(generation));
    let decoded = Envelope::decode(&append.payload).unwrap();
    assert_eq!(decoded.instance_id, id);
    assert_eq!(decoded.occurred_at_ms(), T0 + 300);
    assert!(matches!(
        decoded.event,
        Event::InstanceTurnedUnhealthy(InstanceTurnedUnhealthy { deadline_ms, generation: g, .. })
            if deadline_ms == T0 + 300 && g == generation
    ));
}

#[test]
fn recovery_gives_leases_with_unknown_beats_a_full_window() {
    let mut table = LeaseTable::new(no_sp());
    table.begin_recovery();
    table
        .apply(1, &envelope(&key(1), T0, registration(Some(100), false)))
        .unwrap();
    table
        .apply(2, &envelope(&key(2), T0, registration(Some(100), false)))
        .unwrap();
    // Beats of instance 2 are replayed; those of instance 1 were lost to retention.
    table.heartbeat(&key(2), T0 + 9_950);
    table.advance(T0 + 10_000);
    assert!(
        table.take_transitions().is_empty(),
        "nothing while recovering"
    );
    table.finish_recovery(T0 + 10_000, Some(T0 + 9_900));
    table.advance(T0 + 10_000);
    assert!(table.take_transitions().is_empty(), "no false unhealthy");
    assert_eq!(table.lease(&key(1)).unwrap().deadline_ms, T0 + 10_200);
    assert_eq!(table.lease(&key(2)).unwrap().deadline_ms, T0 + 10_250);
    table.advance(T0 + 10_200);
    assert_eq!(kinds(&table.take_transitions()), ["unhealthy"]);
}

#[test]
fn recovery_revives_unhealthy_leases_that_beat_meanwhile() {
    let mut table = LeaseTable::new(no_sp());
    table.begin_recovery();
    table
        .apply(1, &envelope(&key(1), T0, registration(Some(100), false)))
        .unwrap();
    let unhealthy = InstanceTurnedUnhealthy {
        last_heartbeat_ms: Some(T0),
        deadline_ms: T0 + 300,
        generation: 1,
    };
    table
        .apply(
            2,
            &envelope(&key(1), T0 + 300, Event::InstanceTurnedUnhealthy(unhealthy)),
        )
        .unwrap();
    table.heartbeat(&key(1), T0 + 400);
    table.finish_recovery(T0 + 500, None);
    let revived = table.take_transitions();
    assert_eq!(kinds(&revived), ["healthy"]);
    assert_eq!(revived[0].after_sequence(), 2);
}

fn register_fleet(h: &mut Harness, count: u8, ttl: u64) {
    for n in 0..count {
        h.register(n, T0, ttl, true);
    }
}

#[test]
fn self_preservation_holds_a_mass_silence_and_exits_when_beats_return() {
    let mut h = Harness::new(sp_rules(3));
    register_fleet(&mut h, 9, 100);
    // Instances 0..=5 fall silent; 6..=8 keep beating.
    for round in 1..=4 {
        let at = T0 + round * 50;
        for n in 6..9 {
            h.beat(n, at);
        }
        h.advance(at);
    }
    // At T0 + 200 the silent six are overdue (two TTLs of silence): 6 > 9/3, before any deadline.
    assert_eq!(kinds(&h.log), ["sp-entered"]);
    assert!(h.table.self_preservation_active());
    assert_eq!(h.table.counts().overdue, 6);
    assert!(matches!(
        h.log[0].kind,
        TransitionKind::SelfPreservationEntered {
            at_risk: 6,
            total: 9,
            ..
        }
    ));
    // Deadlines pass: held, not published.
    for round in 5..=10 {
        let at = T0 + round * 50;
        for n in 6..9 {
            h.beat(n, at);
        }
        h.advance(at);
    }
    assert_eq!(kinds(&h.log), ["sp-entered"]);
    assert_eq!(h.state(0), Some(LeaseState::Held));
    // A held instance that beats again is simply healthy.
    h.beat(0, T0 + 500);
    assert_eq!(h.state(0), Some(LeaseState::Healthy));
    // Exit one window after entering, since beats kept arriving.
    let entered_at = h.log[0].at_ms;
    h.beat(6, entered_at + 1_000);
    h.advance(entered_at + 1_000);
    assert_eq!(kinds(&h.log), ["sp-entered", "sp-exited"]);
    assert!(!h.table.self_preservation_active());
    // The held ones got a full window from the exit, and are reprieved: no second episode.
    let lease = h.table.lease(&key(1)).unwrap();
    assert_eq!(lease.deadline_ms, entered_at + 1_000 + 300);
    assert!(lease.reprieved);
    let exit = entered_at + 1_000;
    for at in (exit + 50..=exit + 300).step_by(50) {
        for n in [0, 6, 7, 8] {
            h.beat(n, at);
        }
        h.advance(at);
    }
    let tail = kinds(&h.log[2..]);
    assert_eq!(
        tail, ["unhealthy"; 5],
        "the dead five, not protected forever"
    );
    assert!(!h.table.self_preservation_active());
}

#[test]
fn self_preservation_waits_for_beats_before_exiting() {
    let mut h = Harness::new(sp_rules(3));
    register_fleet(&mut h, 6, 100);
    h.advance(T0 + 200);
    assert_eq!(kinds(&h.log), ["sp-entered"]);
    // Nothing beats at all: the engine has no evidence, so it stays (and publishes nothing).
    h.advance(T0 + 60_000);
    assert_eq!(kinds(&h.log), ["sp-entered"]);
    assert_eq!(h.table.counts().held, 6);
    assert_eq!(h.table.next_timer(), None);
    // One beat recorded after entering: the heartbeat path works. Exit at once (window passed).
    h.beat(3, T0 + 60_000);
    h.advance(T0 + 60_001);
    assert_eq!(kinds(&h.log), ["sp-entered", "sp-exited"]);
    // Five remain silent: unhealthy a full window after the exit, then expired.
    h.beat(3, T0 + 60_200);
    let fired = h.advance(T0 + 60_001 + 300);
    assert_eq!(kinds(&fired), ["unhealthy"; 5]);
    h.beat(3, T0 + 60_700);
    let fired = h.advance(T0 + 60_001 + 800);
    assert_eq!(kinds(&fired), ["expired"; 5]);
}

#[test]
fn small_losses_do_not_trigger_self_preservation() {
    let mut h = Harness::new(sp_rules(3));
    register_fleet(&mut h, 9, 100);
    for round in 1..=10 {
        let at = T0 + round * 50;
        for n in 2..9 {
            h.beat(n, at);
        }
        h.advance(at);
    }
    // Two of nine is below both the share and the minimum.
    assert_eq!(kinds(&h.log), ["unhealthy", "unhealthy"]);
}

#[test]
fn an_exit_read_from_the_log_restarts_windows_too() {
    let mut h = Harness::new(sp_rules(3));
    register_fleet(&mut h, 6, 100);
    h.advance(T0 + 200);
    assert!(h.table.self_preservation_active());
    let mut exited = Envelope::new(
        "",
        "",
        "",
        Event::SelfPreservationExited(SelfPreservationExited { total: 6 }),
    );
    exited.occurred_at = millis_to_datetime(T0 + 250);
    h.apply(&exited);
    assert!(!h.table.self_preservation_active());
    assert_eq!(h.table.lease(&key(0)).unwrap().deadline_ms, T0 + 550);
}

#[test]
fn snapshots_round_trip_and_refuse_damage() {
    let mut h = Harness::new(sp_rules(100));
    for n in 0..20 {
        h.register(n, T0 + i64::from(n), 100 + u64::from(n), n % 2 == 0);
    }
    h.advance(T0 + 310);
    h.beat(0, T0 + 305);
    let bytes = h.table.encode_snapshot(b"header");
    let (mut restored, header) = LeaseTable::decode_snapshot(sp_rules(100), &bytes).unwrap();
    assert_eq!(header, b"header");
    assert_eq!(restored.counts(), h.table.counts());
    for n in 0..20 {
        assert_eq!(restored.lease(&key(n)), h.table.lease(&key(n)), "lease {n}");
    }
    // The restored table decides exactly what the original decides.
    let before = h.log.len();
    h.advance(T0 + 5_000);
    restored.advance(T0 + 5_000);
    let ids = |transitions: &[Transition]| {
        let mut ids: Vec<String> = transitions.iter().map(Transition::event_id).collect();
        ids.sort();
        ids
    };
    let future = ids(&h.log[before..]);
    assert!(!future.is_empty());
    assert_eq!(ids(&restored.take_transitions()), future);
    assert!(
        LeaseTable::decode_snapshot(no_sp(), &bytes).is_err(),
        "other rules"
    );
    let mut damaged = bytes.clone();
    damaged[40] ^= 1;
    assert!(LeaseTable::decode_snapshot(sp_rules(100), &damaged).is_err());
    assert!(LeaseTable::decode_snapshot(sp_rules(100), &bytes[..bytes.len() / 2]).is_err());
    assert!(LeaseTable::decode_snapshot(sp_rules(100), b"").is_err());
}

#[test]
fn invalid_ids_fail_only_where_they_matter() {
    let mut table = LeaseTable::new(no_sp());
    let mut bad = envelope(&key(1), T0, registration(Some(100), true));
    bad.instance_id = "not-an-id".into();
    assert!(table.apply(1, &bad).is_err());
    let mut harmless = envelope(&key(1), T0, registration(None, true));
    harmless.instance_id = "not-an-id".into();
    assert!(table.apply(2, &harmless).is_ok());
    table.heartbeats(&HeartbeatsReceived {
        beats: vec![Beat {
            instance_id: "zz".into(),
            at_ms: T0,
        }],
    });
    assert_eq!(table.counts().unknown_beats, 1);
}

#[test]
fn a_lease_record_is_small() {
    assert!(std::mem::size_of::<Lease>() <= 72);
}

// ----- property tests against a reference model -------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Register {
        instance: u8,
        ttl: Option<u64>,
        ephemeral: bool,
        lag: i64,
    },
    Beat {
        instance: u8,
        lag: i64,
    },
    Deregister {
        instance: u8,
    },
    Advance {
        by: i64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0u8..6, prop::option::weighted(0.9, 1u64..60), any::<bool>(), 0i64..20)
            .prop_map(|(instance, ttl, ephemeral, lag)| Op::Register { instance, ttl, ephemeral, lag }),
        6 => (0u8..6, -5i64..40).prop_map(|(instance, lag)| Op::Beat { instance, lag }),
        1 => (0u8..6).prop_map(|instance| Op::Deregister { instance }),
        5 => (0i64..120).prop_map(|by| Op::Advance { by }),
    ]
}

/// What a transition says, comparable between the table and the model.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Said {
    Unhealthy {
        instance: u8,
        at: i64,
        last_beat: i64,
        deadline: i64,
        generation: u64,
    },
    Healthy {
        instance: u8,
        at: i64,
        beat: i64,
        generation: u64,
    },
    Expired {
        instance: u8,
        at: i64,
        deadline: i64,
        generation: u64,
    },
}

fn said(transition: &Transition) -> Said {
    let instance = |r: &InstanceRef| r.id[0];
    match &transition.kind {
        TransitionKind::TurnedUnhealthy {
            instance: r,
            last_heartbeat_ms,
            deadline_ms,
        } => Said::Unhealthy {
            instance: instance(r),
            at: transition.at_ms,
            last_beat: *last_heartbeat_ms,
            deadline: *deadline_ms,
            generation: r.generation,
        },
        TransitionKind::TurnedHealthy {
            instance: r,
            heartbeat_ms,
        } => Said::Healthy {
            instance: instance(r),
            at: transition.at_ms,
            beat: *heartbeat_ms,
            generation: r.generation,
        },
        TransitionKind::Expired {
            instance: r,
            deadline_ms,
            ..
        } => Said::Expired {
            instance: instance(r),
            at: transition.at_ms,
            deadline: *deadline_ms,
            generation: r.generation,
        },
        other => panic!("self-preservation is off: {other:?}"),
    }
}

#[derive(Debug, Clone)]
struct ModelLease {
    generation: u64,
    window: i64,
    ephemeral: bool,
    last_beat: i64,
    healthy: bool,
    /// Unhealthy deadline while healthy, expiry while unhealthy.
    deadline: i64,
}

/// The rules, written the naive way: scan everything at every step.
#[derive(Debug, Default)]
struct Model {
    now: i64,
    leases: BTreeMap<u8, ModelLease>,
    delete_timeout: i64,
}

impl Model {
    fn advance(&mut self, now: i64, said: &mut Vec<Said>) {
        self.now = self.now.max(now);
        let now = self.now;
        let mut expired = Vec::new();
        for (instance, lease) in self.leases.iter_mut() {
            if lease.healthy && lease.deadline <= now {
                said.push(Said::Unhealthy {
                    instance: *instance,
                    at: now,
                    last_beat: lease.last_beat,
                    deadline: lease.deadline,
                    generation: lease.generation,
                });
                lease.healthy = false;
                lease.deadline += self.delete_timeout;
            }
            if !lease.healthy && lease.ephemeral && lease.deadline <= now {
                said.push(Said::Expired {
                    instance: *instance,
                    at: now,
                    deadline: lease.deadline,
                    generation: lease.generation,
                });
                expired.push(*instance);
            }
        }
        for instance in expired {
            self.leases.remove(&instance);
        }
    }

    fn beat(&mut self, instance: u8, at: i64, said: &mut Vec<Said>) {
        let now = self.now;
        let Some(lease) = self.leases.get_mut(&instance) else {
            return;
        };
        if at <= lease.last_beat {
            return;
        }
        lease.last_beat = at;
        if lease.healthy {
            lease.deadline = at + lease.window;
        } else if at + lease.window > now {
            said.push(Said::Healthy {
                instance,
                at: now,
                beat: at,
                generation: lease.generation,
            });
            lease.healthy = true;
            lease.deadline = at + lease.window;
        }
    }
}

fn run_against_model(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rules = no_sp();
    let mut h = Harness::new(rules.clone());
    let mut model = Model {
        now: T0,
        leases: BTreeMap::new(),
        delete_timeout: rules.delete_timeout_ms,
    };
    for (step, op) in ops.into_iter().enumerate() {
        let before = h.log.len();
        let mut expected = Vec::new();
        let now = model.now;
        match op {
            Op::Register {
                instance,
                ttl,
                ephemeral,
                lag,
            } => {
                let at = now - lag;
                let sequence = h.apply(&envelope(&key(instance), at, registration(ttl, ephemeral)));
                match ttl {
                    None => {
                        model.leases.remove(&instance);
                    }
                    Some(ttl) => {
                        let window = ttl as i64 * 3;
                        let last_beat = model
                            .leases
                            .get(&instance)
                            .map_or(at, |lease| lease.last_beat.max(at));
                        model.leases.insert(
                            instance,
                            ModelLease {
                                generation: sequence,
                                window,
                                ephemeral,
                                last_beat,
                                healthy: true,
                                deadline: last_beat + window,
                            },
                        );
                    }
                }
            }
            Op::Beat { instance, lag } => {
                h.beat(instance, now - lag);
                model.beat(instance, now - lag, &mut expected);
            }
            Op::Deregister { instance } => {
                h.apply(&envelope(
                    &key(instance),
                    now,
                    Event::InstanceDeregistered(InstanceDeregistered {}),
                ));
                model.leases.remove(&instance);
            }
            Op::Advance { by } => {
                h.advance(now + by);
                model.advance(now + by, &mut expected);
            }
        }
        let mut actual: Vec<Said> = h.log[before..].iter().map(said).collect();
        actual.sort();
        expected.sort();
        prop_assert_eq!(&actual, &expected, "step {}", step);
        prop_assert_eq!(h.table.len(), model.leases.len(), "step {}", step);
        for (instance, lease) in &model.leases {
            let view = h.table.lease(&key(*instance));
            prop_assert!(view.is_some(), "step {}: lease {} missing", step, instance);
            let view = view.unwrap_or_else(|| unreachable!());
            prop_assert_eq!(
                view.state == LeaseState::Healthy,
                lease.healthy,
                "step {} lease {}",
                step,
                instance
            );
            prop_assert_eq!(view.last_beat_ms, lease.last_beat);
            prop_assert_eq!(view.deadline_ms, lease.deadline);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_table_agrees_with_the_model_on_every_transition_and_its_time(
        ops in prop::collection::vec(op(), 1..80)
    ) {
        run_against_model(ops)?;
    }

    #[test]
    fn snapshots_taken_anywhere_decide_the_same_future(
        ops in prop::collection::vec(op(), 1..60),
        later in 0i64..2_000,
    ) {
        let mut h = Harness::new(sp_rules(3));
        let mut now = T0;
        for op in ops {
            match op {
                Op::Register { instance, ttl, ephemeral, lag } => {
                    h.apply(&envelope(&key(instance), now - lag, registration(ttl, ephemeral)));
                }
                Op::Beat { instance, lag } => h.beat(instance, now - lag),
                Op::Deregister { instance } => {
                    h.apply(&envelope(&key(instance), now, Event::InstanceDeregistered(InstanceDeregistered {})));
                }
                Op::Advance { by } => {
                    now += by;
                    h.advance(now);
                }
            }
        }
        let bytes = h.table.encode_snapshot(&[]);
        let (mut restored, _) = LeaseTable::decode_snapshot(sp_rules(3), &bytes)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let before = h.log.len();
        h.table.advance(now + later);
        restored.advance(now + later);
        let original: Vec<String> = h.table.take_transitions().iter().map(Transition::event_id).collect();
        let copy: Vec<String> = restored.take_transitions().iter().map(Transition::event_id).collect();
        prop_assert_eq!(original, copy);
        prop_assert_eq!(h.log.len(), before);
    }

    #[test]
    fn counts_always_add_up(ops in prop::collection::vec(op(), 1..80)) {
        let mut h = Harness::new(sp_rules(2));
        let mut now = T0;
        for op in ops {
            match op {
                Op::Register { instance, ttl, ephemeral, lag } => {
                    h.apply(&envelope(&key(instance), now - lag, registration(ttl, ephemeral)));
                }
                Op::Beat { instance, lag } => h.beat(instance, now - lag),
                Op::Deregister { instance } => {
                    h.apply(&envelope(&key(instance), now, Event::InstanceDeregistered(InstanceDeregistered {})));
                }
                Op::Advance { by } => {
                    now += by;
                    h.advance(now);
                }
            }
            let counts = h.table.counts();
            prop_assert_eq!(counts.leases, h.table.len() as u64);
            prop_assert!(counts.healthy + counts.unhealthy == counts.leases, "{:?}", counts);
            let overdue = (0..6).filter(|n| h.state(*n) == Some(LeaseState::Overdue)).count() as u64;
            prop_assert_eq!(counts.overdue, overdue);
            let ids: std::collections::HashSet<String> = h.log.iter().map(Transition::event_id).collect();
            prop_assert_eq!(ids.len(), h.log.len(), "every decision has its own id");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// While self-preservation is active nothing turns unhealthy or expires; and it never sticks:
    /// one beat of a known lease plus one window always ends it.
    #[test]
    fn self_preservation_holds_and_never_sticks(ops in prop::collection::vec(op(), 1..80)) {
        let mut h = Harness::new(sp_rules(2));
        let mut now = T0;
        for op in ops {
            let before = h.log.len();
            let active_before = h.table.self_preservation_active();
            match op {
                Op::Register { instance, ttl, ephemeral, lag } => {
                    h.apply(&envelope(&key(instance), now - lag, registration(ttl, ephemeral)));
                }
                Op::Beat { instance, lag } => h.beat(instance, now - lag),
                Op::Deregister { instance } => {
                    h.apply(&envelope(&key(instance), now, Event::InstanceDeregistered(InstanceDeregistered {})));
                }
                Op::Advance { by } => {
                    now += by;
                    h.advance(now);
                }
            }
            let step = &h.log[before..];
            let exited = step.iter().any(|t| matches!(t.kind, TransitionKind::SelfPreservationExited { .. }));
            if active_before && !exited {
                prop_assert!(
                    step.iter().all(|t| !matches!(
                        t.kind,
                        TransitionKind::TurnedUnhealthy { .. } | TransitionKind::Expired { .. }
                    )),
                    "decided while self-preservation held: {:?}", step
                );
            }
        }
        if h.table.self_preservation_active() {
            let known = (0..6).find(|n| h.state(*n).is_some());
            if let Some(n) = known {
                now += 1;
                h.beat(n, now);
                h.advance(now + 1_000);
                prop_assert!(!h.table.self_preservation_active(), "stuck");
            }
        }
    }
}
