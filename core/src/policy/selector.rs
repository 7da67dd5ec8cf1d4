//! Label selectors: what `matchLabels` and `matchExpressions` select, the Kubernetes way.

use super::model::{LabelRequirement, LabelSelector, Labels, SelectorOperator};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("matchExpressions key {key:?}: operator {operator:?} needs at least one value")]
    ValuesRequired {
        key: String,
        operator: SelectorOperator,
    },
    #[error("matchExpressions key {key:?}: operator {operator:?} takes no values")]
    ValuesForbidden {
        key: String,
        operator: SelectorOperator,
    },
}

impl LabelRequirement {
    /// Whether the labels `get` answers for satisfy this requirement.
    pub fn matches_with<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> bool {
        let value = get(&self.key);
        match self.operator {
            SelectorOperator::In => value.is_some_and(|v| self.values.iter().any(|w| w == v)),
            SelectorOperator::NotIn => value.is_none_or(|v| !self.values.iter().any(|w| w == v)),
            SelectorOperator::Exists => value.is_some(),
            SelectorOperator::DoesNotExist => value.is_none(),
        }
    }

    fn validate(&self) -> Result<(), SelectorError> {
        let needs_values = matches!(
            self.operator,
            SelectorOperator::In | SelectorOperator::NotIn
        );
        match (needs_values, self.values.is_empty()) {
            (true, true) => Err(SelectorError::ValuesRequired {
                key: self.key.clone(),
                operator: self.operator,
            }),
            (false, false) => Err(SelectorError::ValuesForbidden {
                key: self.key.clone(),
                operator: self.operator,
            }),
            _ => Ok(()),
        }
    }
}

impl LabelSelector {
    /// Whether the labels `get` answers for are selected: every `matchLabels` pair present
    /// and every expression satisfied. The empty selector selects everything.
    pub fn matches_with<'a>(&self, get: impl Fn(&str) -> Option<&'a str> + Copy) -> bool {
        self.match_labels
            .iter()
            .all(|(key, value)| get(key) == Some(value.as_str()))
            && self.match_expressions.iter().all(|r| r.matches_with(get))
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.matches_with(|key| labels.get(key).map(String::as_str))
    }

    /// Whether any term of the selector is about `key`.
    pub fn mentions(&self, key: &str) -> bool {
        self.match_labels.contains_key(key) || self.match_expressions.iter().any(|r| r.key == key)
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// The API server's checks on expressions: `In`/`NotIn` need values, the others none.
    pub fn validate(&self) -> Result<(), SelectorError> {
        self.match_expressions
            .iter()
            .try_for_each(LabelRequirement::validate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expression(key: &str, operator: SelectorOperator, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_labels: Labels::new(),
            match_expressions: vec![LabelRequirement {
                key: key.into(),
                operator,
                values: values.iter().map(|v| v.to_string()).collect(),
            }],
        }
    }

    #[test]
    fn the_empty_selector_selects_everything() {
        assert!(LabelSelector::default().matches(&Labels::new()));
        assert!(LabelSelector::default().matches(&labels(&[("pod", "a")])));
    }

    #[test]
    fn match_labels_need_every_pair() {
        let selector = LabelSelector {
            match_labels: labels(&[("pod", "a"), ("tier", "web")]),
            match_expressions: vec![],
        };
        assert!(selector.matches(&labels(&[("pod", "a"), ("tier", "web"), ("x", "y")])));
        assert!(!selector.matches(&labels(&[("pod", "a")])));
        assert!(!selector.matches(&labels(&[("pod", "a"), ("tier", "db")])));
    }

    #[test]
    fn each_operator_selects_as_kubernetes_does() {
        use SelectorOperator::*;
        let a = labels(&[("pod", "a")]);
        let b = labels(&[("pod", "b")]);
        let none = Labels::new();
        let cases = [
            (expression("pod", In, &["a", "c"]), [true, false, false]),
            (expression("pod", NotIn, &["a", "c"]), [false, true, true]),
            (expression("pod", Exists, &[]), [true, true, false]),
            (expression("pod", DoesNotExist, &[]), [false, false, true]),
        ];
        for (selector, expected) in cases {
            let got = [
                selector.matches(&a),
                selector.matches(&b),
                selector.matches(&none),
            ];
            assert_eq!(got, expected, "{selector:?}");
        }
    }

    #[test]
    fn expressions_and_labels_add_up() {
        let mut selector = expression("pod", SelectorOperator::NotIn, &["b"]);
        selector.match_labels = labels(&[("tier", "web")]);
        assert!(selector.matches(&labels(&[("tier", "web"), ("pod", "a")])));
        assert!(!selector.matches(&labels(&[("tier", "web"), ("pod", "b")])));
        assert!(!selector.matches(&labels(&[("pod", "a")])));
        assert!(selector.mentions("pod") && selector.mentions("tier") && !selector.mentions("x"));
    }

    #[test]
    fn expressions_with_the_wrong_values_are_refused() {
        use SelectorOperator::*;
        assert!(expression("k", In, &[]).validate().is_err());
        assert!(expression("k", NotIn, &[]).validate().is_err());
        assert!(expression("k", Exists, &["v"]).validate().is_err());
        assert!(expression("k", DoesNotExist, &["v"]).validate().is_err());
        assert!(expression("k", In, &["v"]).validate().is_ok());
        assert!(expression("k", Exists, &[]).validate().is_ok());
    }
}
