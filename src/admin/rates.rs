//! Message rates per address for `GET /api/addresses` and `/api/addresses/{name}`, from the
//! counters the shards keep per address (messages accepted, deliveries made; plain additions on
//! the message path) sampled by the admin thread when it lists the addresses: a rate is the
//! difference between the counts of this request and those of an earlier list, over the time
//! between them. No thread polls the shards for it: the first list after a start (or after
//! more than [`MAX_SAMPLE_AGE`]) has no rates yet (`null`), the next one has.
//!
//! Bounds: the sample keeps the counts of the addresses of one list (at most
//! [`MAX_LIST_LIMIT`](super::MAX_LIST_LIMIT)); an address not in it has no rate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::broker::address::AddressInfo;

/// The shortest window a rate is computed over (a shorter one would be mostly noise).
pub const MIN_WINDOW: Duration = Duration::from_millis(250);
/// A list replaces the sample once it is this old, so windows stay about this long.
pub const RESAMPLE_AFTER: Duration = Duration::from_secs(1);
/// A sample older than this is not used (a rate over an hour says little about now).
pub const MAX_SAMPLE_AGE: Duration = Duration::from_secs(300);

/// One address's rates, messages per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AddressRates {
    pub in_per_second: f64,
    pub out_per_second: f64,
    pub window_seconds: f64,
}

struct Sample {
    at: Instant,
    /// (messages in, messages out) by address.
    counts: HashMap<Bytes, (u64, u64)>,
}

/// The last sample (see the module docs).
#[derive(Default)]
pub struct Rates {
    sample: Mutex<Option<Sample>>,
}

impl Rates {
    /// The rates of `infos` (in order; `None` where there is no earlier count), now. With
    /// `whole_list` (a list of the addresses, not one address), these counts become the next
    /// sample once the present one is [`RESAMPLE_AFTER`] old.
    pub fn sample<'a>(
        &self,
        infos: impl Iterator<Item = &'a AddressInfo>,
        whole_list: bool,
    ) -> Vec<Option<AddressRates>> {
        let now = Instant::now();
        let infos: Vec<&AddressInfo> = infos.collect();
        let mut sample = self.sample.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let usable = sample.as_ref().filter(|sample| {
            let age = now.duration_since(sample.at);
            (MIN_WINDOW..=MAX_SAMPLE_AGE).contains(&age)
        });
        let rates = infos
            .iter()
            .map(|info| {
                let base = usable?;
                let window = now.duration_since(base.at).as_secs_f64();
                let (was_in, was_out) = base.counts.get(&info.name).copied().unwrap_or((0, 0));
                // Counts start again when an idle address is dropped and comes back.
                let since = |now: u64, was: u64| if now >= was { now - was } else { now };
                Some(AddressRates {
                    in_per_second: since(info.messages_in, was_in) as f64 / window,
                    out_per_second: since(info.messages_out, was_out) as f64 / window,
                    window_seconds: window,
                })
            })
            .collect();
        let stale = sample.as_ref().is_none_or(|sample| now.duration_since(sample.at) >= RESAMPLE_AFTER);
        if whole_list && stale {
            let counts = infos.iter().map(|info| (info.name.clone(), (info.messages_in, info.messages_out))).collect();
            *sample = Some(Sample { at: now, counts });
        }
        rates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &'static str, messages_in: u64, messages_out: u64) -> AddressInfo {
        AddressInfo { name: Bytes::from_static(name.as_bytes()), messages_in, messages_out, ..Default::default() }
    }

    #[test]
    fn a_rate_needs_an_earlier_list_and_a_window() {
        let rates = Rates::default();
        assert_eq!(rates.sample([info("a", 10, 0)].iter(), true), vec![None], "no earlier count");
        assert_eq!(rates.sample([info("a", 20, 0)].iter(), true), vec![None], "a window too short");
        // Move the sample back in time rather than wait.
        rates.sample.lock().unwrap().as_mut().unwrap().at -= Duration::from_secs(2);
        let [Some(rate)] = rates.sample([info("a", 30, 4), info("b", 6, 0)].iter().take(1), true)[..] else {
            panic!("a rate")
        };
        assert!((rate.in_per_second - 10.0).abs() < 0.1 && (rate.out_per_second - 2.0).abs() < 0.1, "{rate:?}");
    }
}
