//! [`Instances`]: an immutable view of a service's instances as discovered, with how stale it
//! is, and the selection helpers (healthy only, by metadata, weighted random).
//!
//! Helpers return new views and never touch the consumer's cache; they are cheap (the
//! instances are shared, only the list of references is copied).

use std::sync::Arc;
use std::time::Duration;

use rand::seq::IndexedRandom;
use tokio::time::Instant;

use crate::instance::Instance;

/// A service's instances at one revision.
///
/// ```
/// use sdk::{Instance, Instances};
///
/// let healthy = Instance::example();
/// let sick = Instance { healthy: false, port: 8081, ..Instance::example() };
/// let instances = Instances::from_instances(vec![healthy, sick], 7);
/// assert_eq!(instances.len(), 2);
/// assert_eq!(instances.healthy().len(), 1);
/// assert_eq!(instances.routable().choose_weighted().unwrap().port, 8080);
/// ```
#[derive(Debug, Clone)]
pub struct Instances {
    items: Arc<[Arc<Instance>]>,
    revision: u64,
    stale_since: Option<Instant>,
}

impl Instances {
    pub(crate) fn new(
        items: Vec<Arc<Instance>>,
        revision: u64,
        stale_since: Option<Instant>,
    ) -> Instances {
        Instances {
            items: items.into(),
            revision,
            stale_since,
        }
    }

    pub(crate) fn empty() -> Instances {
        Instances::new(Vec::new(), 0, None)
    }

    /// A live view of `instances` at `revision` (for tests and custom sources).
    ///
    /// ```
    /// let instances = sdk::Instances::from_instances(vec![sdk::Instance::example()], 1);
    /// assert!(!instances.is_stale());
    /// ```
    pub fn from_instances(instances: Vec<Instance>, revision: u64) -> Instances {
        Instances::new(
            instances.into_iter().map(Arc::new).collect(),
            revision,
            None,
        )
    }

    /// The service revision this view is at (0: the service has no history).
    ///
    /// ```
    /// # let instances = sdk::Instances::from_instances(vec![], 3);
    /// assert_eq!(instances.revision(), 3);
    /// ```
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// `None` while the cache is kept current by a live watch; otherwise how long ago the
    /// connection to the registry was lost (the view may miss changes since then).
    ///
    /// ```
    /// # let instances = sdk::Instances::from_instances(vec![], 3);
    /// assert_eq!(instances.staleness(), None);
    /// ```
    pub fn staleness(&self) -> Option<Duration> {
        self.stale_since.map(|since| since.elapsed())
    }

    /// Since when the view is stale (`None`: live).
    pub fn stale_since(&self) -> Option<Instant> {
        self.stale_since
    }

    /// True when the registry could not be reached since [`Instances::stale_since`].
    ///
    /// ```
    /// # let instances = sdk::Instances::from_instances(vec![], 3);
    /// assert!(!instances.is_stale());
    /// ```
    pub fn is_stale(&self) -> bool {
        self.stale_since.is_some()
    }

    /// Number of instances.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The instances, ordered by id.
    ///
    /// ```
    /// # let instances = sdk::Instances::from_instances(vec![sdk::Instance::example()], 1);
    /// let addresses: Vec<String> = instances.iter().map(|i| i.address()).collect();
    /// assert_eq!(addresses, ["10.0.0.1:8080"]);
    /// ```
    pub fn iter(&self) -> impl Iterator<Item = &Instance> + '_ {
        self.items.iter().map(|item| item.as_ref())
    }

    /// One instance by id.
    ///
    /// ```
    /// # let instances = sdk::Instances::from_instances(vec![sdk::Instance::example()], 1);
    /// let id = sdk::Instance::example().id;
    /// assert!(instances.get(&id).is_some());
    /// ```
    pub fn get(&self, id: &str) -> Option<&Instance> {
        self.iter().find(|instance| instance.id == id)
    }

    /// The instances for which `keep` is true.
    ///
    /// ```
    /// # let instances = sdk::Instances::from_instances(vec![sdk::Instance::example()], 1);
    /// let grpc = instances.filter(|i| i.protocol == "grpc");
    /// assert!(grpc.is_empty());
    /// ```
    pub fn filter(&self, mut keep: impl FnMut(&Instance) -> bool) -> Instances {
        Instances {
            items: self
                .items
                .iter()
                .filter(|item| keep(item))
                .cloned()
                .collect(),
            revision: self.revision,
            stale_since: self.stale_since,
        }
    }

    /// Only the healthy instances.
    ///
    /// ```
    /// # let instances = sdk::Instances::from_instances(vec![sdk::Instance::example()], 1);
    /// assert_eq!(instances.healthy().len(), 1);
    /// ```
    pub fn healthy(&self) -> Instances {
        self.filter(|instance| instance.healthy)
    }

    /// Without the isolated instances.
    ///
    /// ```
    /// # let instances = sdk::Instances::from_instances(vec![sdk::Instance::example()], 1);
    /// assert_eq!(instances.without_isolated().len(), 1);
    /// ```
    pub fn without_isolated(&self) -> Instances {
        self.filter(|instance| !instance.isolated)
    }

    /// The instances that should take traffic: healthy, not isolated, weight above 0.
    ///
    /// ```
    /// # let instances = sdk::Instances::from_instances(vec![sdk::Instance::example()], 1);
    /// assert_eq!(instances.routable().len(), 1);
    /// ```
    pub fn routable(&self) -> Instances {
        self.filter(Instance::is_routable)
    }

    /// The instances whose metadata has `key` = `value`.
    ///
    /// ```
    /// # let instances = sdk::Instances::from_instances(vec![sdk::Instance::example()], 1);
    /// assert!(instances.with_metadata("zone", "a").is_empty());
    /// ```
    pub fn with_metadata(&self, key: &str, value: &str) -> Instances {
        self.filter(|instance| instance.metadata.get(key).is_some_and(|v| v == value))
    }

    /// The instances whose metadata has every entry of `selector`.
    ///
    /// ```
    /// # let instances = sdk::Instances::from_instances(vec![sdk::Instance::example()], 1);
    /// let eu = instances.matching([("region", "eu"), ("tier", "gold")]);
    /// assert!(eu.is_empty());
    /// ```
    pub fn matching<'a>(
        &self,
        selector: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Instances {
        let selector: Vec<(&str, &str)> = selector.into_iter().collect();
        self.filter(|instance| {
            selector
                .iter()
                .all(|(key, value)| instance.metadata.get(*key).is_some_and(|v| v == value))
        })
    }

    /// One instance at random, each with a probability proportional to its weight; `None`
    /// when no instance has a weight above 0. Usually called on [`Instances::routable`].
    ///
    /// ```
    /// # let instances = sdk::Instances::from_instances(vec![sdk::Instance::example()], 1);
    /// let target = instances.routable().choose_weighted();
    /// assert_eq!(target.map(|i| i.port), Some(8080));
    /// ```
    pub fn choose_weighted(&self) -> Option<Arc<Instance>> {
        self.choose_weighted_with(&mut rand::rng())
    }

    /// [`Instances::choose_weighted`] with a given random number generator (for reproducible
    /// selection in tests).
    ///
    /// ```
    /// use rand::SeedableRng;
    /// # let instances = sdk::Instances::from_instances(vec![sdk::Instance::example()], 1);
    /// let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    /// assert!(instances.choose_weighted_with(&mut rng).is_some());
    /// ```
    pub fn choose_weighted_with<R: rand::Rng + ?Sized>(
        &self,
        rng: &mut R,
    ) -> Option<Arc<Instance>> {
        self.items
            .choose_weighted(rng, |instance| u64::from(instance.weight))
            .ok()
            .cloned()
    }
}

impl<'a> IntoIterator for &'a Instances {
    type Item = &'a Instance;
    type IntoIter = Box<dyn Iterator<Item = &'a Instance> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::SeedableRng;

    use super::*;

    fn instance(port: u16, weight: u32, healthy: bool, isolated: bool, zone: &str) -> Instance {
        Instance {
            id: event_log::instance_id("default", "echo", "10.0.0.1", port),
            port,
            weight,
            healthy,
            isolated,
            metadata: BTreeMap::from([("zone".to_owned(), zone.to_owned())]),
            ..Instance::example()
        }
    }

    fn fleet() -> Instances {
        Instances::from_instances(
            vec![
                instance(1, 100, true, false, "a"),
                instance(2, 300, true, false, "b"),
                instance(3, 100, false, false, "a"),
                instance(4, 100, true, true, "a"),
                instance(5, 0, true, false, "a"),
            ],
            9,
        )
    }

    #[test]
    fn filters_compose_and_keep_the_revision() {
        let fleet = fleet();
        assert_eq!(fleet.healthy().len(), 4);
        assert_eq!(fleet.without_isolated().len(), 4);
        let routable = fleet.routable();
        let ports: Vec<u16> = routable.iter().map(|i| i.port).collect();
        assert_eq!(ports.len(), 2);
        assert!(ports.contains(&1) && ports.contains(&2));
        assert_eq!(fleet.with_metadata("zone", "a").len(), 4);
        assert_eq!(fleet.routable().with_metadata("zone", "a").len(), 1);
        assert_eq!(fleet.matching([("zone", "b")]).len(), 1);
        assert_eq!(fleet.matching([("zone", "b"), ("x", "y")]).len(), 0);
        assert_eq!(routable.revision(), 9);
    }

    #[test]
    fn weighted_choice_follows_the_weights() {
        let routable = fleet().routable();
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let mut heavy = 0;
        let draws = 4000;
        for _ in 0..draws {
            let chosen = routable.choose_weighted_with(&mut rng).unwrap();
            if chosen.port == 2 {
                heavy += 1;
            }
        }
        // Weight 300 against 100: about three quarters.
        let share = f64::from(heavy) / f64::from(draws);
        assert!((0.70..0.80).contains(&share), "share {share}");
    }

    #[test]
    fn nothing_to_choose_is_none() {
        assert!(Instances::empty().choose_weighted().is_none());
        let zero = Instances::from_instances(vec![instance(1, 0, true, false, "a")], 1);
        assert!(zero.choose_weighted().is_none());
    }
}
