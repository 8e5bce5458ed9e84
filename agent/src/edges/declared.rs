//! The edges the Services' `internal-tcp-watcher.io/wakes` annotations
//! declare, followed through the map events the counting loop applies, so
//! the reporter hears the whole set again only when it changed.

use std::collections::BTreeMap;

use super::EdgeKey;
use crate::resolve::{MapChange, MapEvent, ServiceRef};

/// Each Service's declared callees (only Services that declare any).
#[derive(Debug, Default)]
pub struct Declarations {
    wakes: BTreeMap<ServiceRef, Vec<ServiceRef>>,
}

impl Declarations {
    /// Follows one map event; true when the declared edges changed.
    pub fn apply(&mut self, event: &MapEvent) -> bool {
        match event {
            MapEvent::Reset(map) => {
                let wakes: BTreeMap<_, _> = map
                    .services
                    .iter()
                    .filter(|(_, state)| !state.wakes.is_empty())
                    .map(|(service, state)| (service.clone(), state.wakes.clone()))
                    .collect();
                let changed = wakes != self.wakes;
                self.wakes = wakes;
                changed
            }
            MapEvent::Changes(changes) => {
                let mut changed = false;
                for change in changes {
                    changed |= match change {
                        MapChange::ServiceSet(service, state) if state.wakes.is_empty() => {
                            self.wakes.remove(service).is_some()
                        }
                        MapChange::ServiceSet(service, state) => {
                            self.wakes.insert(service.clone(), state.wakes.clone())
                                != Some(state.wakes.clone())
                        }
                        MapChange::ServiceRemoved(service) => self.wakes.remove(service).is_some(),
                        MapChange::Set(..) | MapChange::Remove(_) => false,
                    };
                }
                changed
            }
        }
    }

    /// Every declared edge (caller, callee).
    pub fn edges(&self) -> Vec<EdgeKey> {
        self.wakes
            .iter()
            .flat_map(|(from, to)| to.iter().map(move |to| (from.clone(), to.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::{ServiceMap, ServiceState};

    fn svc(ns: &str, name: &str) -> ServiceRef {
        ServiceRef::new(ns, name)
    }

    fn waking(targets: &[ServiceRef]) -> ServiceState {
        ServiceState {
            wakes: targets.to_vec(),
            ..ServiceState::default()
        }
    }

    fn shown(d: &Declarations) -> Vec<String> {
        d.edges()
            .iter()
            .map(|(a, b)| format!("{a} -> {b}"))
            .collect()
    }

    #[test]
    fn follows_resets_and_changes() {
        let mut d = Declarations::default();
        let mut map = ServiceMap::default();
        map.services
            .insert(svc("a", "web"), waking(&[svc("b", "api"), svc("a", "db")]));
        map.services.insert(svc("a", "db"), ServiceState::default());
        assert!(d.apply(&MapEvent::Reset(map.clone())));
        assert_eq!(shown(&d), vec!["a/web -> b/api", "a/web -> a/db"]);
        assert!(!d.apply(&MapEvent::Reset(map)), "the same map again");
        assert!(!d.apply(&MapEvent::Changes(vec![MapChange::ServiceSet(
            svc("a", "db"),
            ServiceState {
                hold: true,
                ..ServiceState::default()
            }
        )])));
        assert!(d.apply(&MapEvent::Changes(vec![MapChange::ServiceSet(
            svc("a", "db"),
            waking(&[svc("a", "cache")])
        )])));
        assert!(!d.apply(&MapEvent::Changes(vec![MapChange::ServiceSet(
            svc("a", "db"),
            waking(&[svc("a", "cache")])
        )])));
        assert_eq!(
            shown(&d),
            vec!["a/db -> a/cache", "a/web -> b/api", "a/web -> a/db"]
        );
        assert!(d.apply(&MapEvent::Changes(vec![
            MapChange::ServiceRemoved(svc("a", "web")),
            MapChange::ServiceSet(svc("a", "db"), ServiceState::default()),
        ])));
        assert_eq!(shown(&d), Vec::<String>::new());
    }
}
