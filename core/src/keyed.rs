//! Tables of records that carry their own key: sent as a sequence of records (JSON object keys
//! must be strings; ours are structs), diffed into upserts and removals by key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A record that knows its key in its table.
pub trait Keyed {
    type Key: Ord + Clone;
    fn key(&self) -> Self::Key;
}

/// The upserts and removals that turn one table into another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(
    serialize = "T: Serialize, T::Key: Serialize",
    deserialize = "T: Deserialize<'de>, T::Key: Deserialize<'de>"
))]
pub struct KeyedDelta<T: Keyed> {
    #[serde(default = "Vec::new", skip_serializing_if = "Vec::is_empty")]
    pub upsert: Vec<T>,
    #[serde(default = "Vec::new", skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<T::Key>,
}

impl<T: Keyed> Default for KeyedDelta<T> {
    fn default() -> Self {
        Self {
            upsert: Vec::new(),
            remove: Vec::new(),
        }
    }
}

impl<T: Keyed + Clone + PartialEq> KeyedDelta<T> {
    /// What turns `old` into `new`: records new or different, keys gone.
    pub fn between(old: &BTreeMap<T::Key, T>, new: &BTreeMap<T::Key, T>) -> Self {
        Self {
            upsert: new
                .iter()
                .filter(|(key, record)| old.get(*key) != Some(*record))
                .map(|(_, record)| record.clone())
                .collect(),
            remove: old
                .keys()
                .filter(|key| !new.contains_key(*key))
                .cloned()
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }

    pub fn apply_to(&self, table: &mut BTreeMap<T::Key, T>) {
        for key in &self.remove {
            table.remove(key);
        }
        for record in &self.upsert {
            table.insert(record.key(), record.clone());
        }
    }
}

/// `#[serde(with = "keyed_seq")]` for a `BTreeMap<K, T>` keyed by `T::key()`.
pub mod keyed_seq {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<T, S>(map: &BTreeMap<T::Key, T>, s: S) -> Result<S::Ok, S::Error>
    where
        T: Keyed + Serialize,
        S: Serializer,
    {
        s.collect_seq(map.values())
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<BTreeMap<T::Key, T>, D::Error>
    where
        T: Keyed + Deserialize<'de>,
        D: Deserializer<'de>,
    {
        let records: Vec<T> = Vec::deserialize(d)?;
        Ok(records.into_iter().map(|r| (r.key(), r)).collect())
    }
}
