//! A compact binary image of the lease table, so that a restart replays only the events after it.
//!
//! Layout (little endian): magic `HEALTHSNAP`, format version (u16), the caller's header bytes
//! (stream prefix and positions, opaque here), the rules the table was built with (a snapshot
//! taken under other rules is refused: its deadlines were computed with them), the table's clock
//! and self-preservation state, the interned names, the leases (58 bytes each), the recent
//! misses, and an FNV-1a checksum of everything before it. A snapshot is a cache: any problem
//! decoding it means "replay from the start", never a guess.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::{Lease, LeaseTable, NOT_ARMED, Rules, SelfPreservation, Service, State, service_key};

const MAGIC: &[u8; 10] = b"HEALTHSNAP";
const VERSION: u16 = 1;

/// Why a snapshot was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unusable snapshot: {0}")]
pub struct SnapshotError(pub String);

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, value: u8) {
        self.0.push(value);
    }
    fn u16(&mut self, value: u16) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }
    fn u32(&mut self, value: u32) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }
    fn u64(&mut self, value: u64) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }
    fn i64(&mut self, value: i64) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }
    fn f64(&mut self, value: f64) {
        self.u64(value.to_bits());
    }
    fn bytes(&mut self, value: &[u8]) {
        self.u64(value.len() as u64);
        self.0.extend_from_slice(value);
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], SnapshotError> {
        if self.bytes.len() < count {
            return Err(SnapshotError("truncated".into()));
        }
        let (head, tail) = self.bytes.split_at(count);
        self.bytes = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }
    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, SnapshotError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    fn len(&mut self, item_size: usize) -> Result<usize, SnapshotError> {
        let count = usize::try_from(self.u64()?).map_err(|_| SnapshotError("length".into()))?;
        // Refuse counts the remaining bytes cannot hold before allocating anything.
        if count.saturating_mul(item_size) > self.bytes.len() {
            return Err(SnapshotError("length beyond the end".into()));
        }
        Ok(count)
    }
    fn bytes(&mut self) -> Result<&'a [u8], SnapshotError> {
        let count = self.len(1)?;
        self.take(count)
    }
    fn string(&mut self) -> Result<String, SnapshotError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| SnapshotError("utf-8".into()))
    }
}

fn write_rules(writer: &mut Writer, rules: &Rules) {
    writer.f64(rules.unhealthy_ratio);
    writer.i64(rules.delete_timeout_ms);
    match &rules.self_preservation {
        None => writer.u8(0),
        Some(sp) => {
            writer.u8(1);
            writer.f64(sp.share);
            writer.i64(sp.window_ms);
            writer.u64(sp.min_at_risk);
        }
    }
}

impl LeaseTable {
    /// Encodes the table after the caller's `header` (stream positions and the like).
    ///
    /// A lease waiting for its expiry to be acknowledged is stored as unhealthy, so that a
    /// restart decides the expiry again (same event id: deduplicated if it did land).
    pub fn encode_snapshot(&self, header: &[u8]) -> Vec<u8> {
        let mut writer = Writer(Vec::with_capacity(64 + self.len() * 58));
        writer.0.extend_from_slice(MAGIC);
        writer.u16(VERSION);
        writer.bytes(header);
        write_rules(&mut writer, &self.rules);
        writer.i64(self.now);
        writer.u8(u8::from(self.sp.active));
        writer.i64(self.sp.entered_at);
        writer.u8(u8::from(self.sp.beat_seen));
        writer.u64(self.sp.last_sequence);
        writer.i64(self.sp.exited_at);
        writer.u64(self.unknown_beats);
        writer.u64(self.services.len() as u64);
        for service in &self.services {
            writer.bytes(service.namespace.as_bytes());
            writer.bytes(service.service.as_bytes());
        }
        writer.u64(self.len() as u64);
        for lease in self.slots.iter().filter(|l| l.state != State::Vacant) {
            writer.0.extend_from_slice(&lease.id);
            writer.u32(lease.service);
            writer.u32(lease.ttl_ms);
            let state = match lease.state {
                State::Expiring => State::Unhealthy,
                other => other,
            };
            writer.u8(state as u8);
            writer.u8(lease.flags);
            writer.u64(lease.generation);
            writer.u64(lease.subject_seq);
            writer.i64(lease.last_beat_ms);
            writer.i64(lease.deadline_ms);
        }
        writer.u64(self.recent_misses.len() as u64);
        for miss in &self.recent_misses {
            writer.i64(*miss);
        }
        let checksum = fnv1a(&writer.0);
        writer.u64(checksum);
        writer.0
    }

    /// Decodes a snapshot made by [`LeaseTable::encode_snapshot`] under the same `rules`,
    /// returning the table and the caller's header.
    pub fn decode_snapshot(
        rules: Rules,
        bytes: &[u8],
    ) -> Result<(LeaseTable, Vec<u8>), SnapshotError> {
        if bytes.len() < MAGIC.len() + 2 + 8 {
            return Err(SnapshotError("too short".into()));
        }
        let (body, checksum) = bytes.split_at(bytes.len() - 8);
        let mut expected = [0u8; 8];
        expected.copy_from_slice(checksum);
        if fnv1a(body) != u64::from_le_bytes(expected) {
            return Err(SnapshotError("checksum mismatch".into()));
        }
        let mut reader = Reader { bytes: body };
        if reader.take(MAGIC.len())? != MAGIC {
            return Err(SnapshotError("not a health-engine snapshot".into()));
        }
        let version = reader.u16()?;
        if version != VERSION {
            return Err(SnapshotError(format!("format version {version}")));
        }
        let header = reader.bytes()?.to_vec();
        let mut rules_bytes = Writer(Vec::new());
        write_rules(&mut rules_bytes, &rules);
        if reader.take(rules_bytes.0.len())? != rules_bytes.0.as_slice() {
            return Err(SnapshotError("taken under other rules".into()));
        }
        let mut table = LeaseTable::new(rules);
        table.now = reader.i64()?;
        table.sp = SelfPreservation {
            active: reader.u8()? != 0,
            entered_at: reader.i64()?,
            beat_seen: reader.u8()? != 0,
            last_sequence: reader.u64()?,
            exited_at: reader.i64()?,
        };
        table.unknown_beats = reader.u64()?;
        let service_count = reader.len(16)?;
        let mut services = Vec::with_capacity(service_count);
        for _ in 0..service_count {
            let namespace: Arc<str> = reader.string()?.into();
            let service: Arc<str> = reader.string()?.into();
            services.push(Service {
                namespace,
                service,
                refs: 0,
            });
        }
        let lease_count = reader.len(58)?;
        table.slots.reserve_exact(lease_count);
        for _ in 0..lease_count {
            let id = reader.array::<20>()?;
            let service = reader.u32()?;
            let ttl_ms = reader.u32()?;
            let state = State::from_u8(reader.u8()?)
                .filter(|state| *state != State::Vacant && *state != State::Expiring)
                .ok_or_else(|| SnapshotError("lease state".into()))?;
            let lease = Lease {
                id,
                service,
                ttl_ms,
                state,
                flags: reader.u8()?,
                generation: reader.u64()?,
                subject_seq: reader.u64()?,
                last_beat_ms: reader.i64()?,
                deadline_ms: reader.i64()?,
                armed_at: NOT_ARMED,
            };
            let entry = services
                .get_mut(service as usize)
                .ok_or_else(|| SnapshotError("service index".into()))?;
            entry.refs += 1;
            if table.find(&id).is_some() {
                return Err(SnapshotError("duplicate lease".into()));
            }
            table.insert(lease);
        }
        let miss_count = reader.len(8)?;
        table.recent_misses = (0..miss_count)
            .map(|_| reader.i64())
            .collect::<Result<VecDeque<_>, _>>()?;
        if !reader.bytes.is_empty() {
            return Err(SnapshotError("trailing bytes".into()));
        }
        // Unused names are dropped from the index but keep their slots, so lease indices stay.
        let mut index = HashMap::new();
        let mut free = Vec::new();
        for (position, service) in services.iter().enumerate() {
            if service.refs == 0 {
                free.push(position as u32);
            } else {
                index.insert(
                    service_key(&service.namespace, &service.service),
                    position as u32,
                );
            }
        }
        table.services = services;
        table.service_index = index;
        table.free_services = free;
        Ok((table, header))
    }
}
