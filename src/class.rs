//! Storage classes: where a key's value lives, chosen by the longest matching key prefix.
//!
//! `persistent` keys are files in the data directory, `volatile` keys files in the volatile
//! directory (tmpfs: gone after a reboot), `memory` keys only in the map (gone when the server
//! stops). Session keys are `memory` whatever their prefix (see `Store::put_with`).

use std::fmt;

use crate::key::{Key, Pattern, Target};

/// Where a key's value is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    Persistent,
    Volatile,
    Memory,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Persistent, Class::Volatile, Class::Memory];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Persistent => "persistent",
            Class::Volatile => "volatile",
            Class::Memory => "memory",
        }
    }

    /// # Errors
    /// `text` names no class.
    pub fn parse(text: &str) -> Result<Class, String> {
        match text {
            "persistent" => Ok(Class::Persistent),
            "volatile" => Ok(Class::Volatile),
            "memory" => Ok(Class::Memory),
            _ => Err(format!(
                "unknown storage class {text:?}: use persistent, volatile or memory"
            )),
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The prefix rules, fixed at start. A prefix covers itself and what is below it (as `SUB`
/// does); the longest matching prefix wins; everything else is `persistent`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassRules {
    /// Longest prefix first, so the first match is the answer.
    rules: Vec<(Key, Class)>,
}

impl Default for ClassRules {
    /// `runtime` is `memory`, as in the system nkv replaces.
    fn default() -> ClassRules {
        ClassRules::new(Vec::new())
    }
}

impl ClassRules {
    /// The default `runtime=memory` plus `rules`; a later rule for the same prefix replaces an
    /// earlier one (so `--class runtime=persistent` turns the default off).
    pub fn new(rules: Vec<(Key, Class)>) -> ClassRules {
        let mut all: Vec<(Key, Class)> = Vec::new();
        let runtime = Key::parse("runtime").expect("\"runtime\" is a valid key");
        for (prefix, class) in std::iter::once((runtime, Class::Memory)).chain(rules) {
            all.retain(|(p, _)| p != &prefix);
            all.push((prefix, class));
        }
        all.sort_by_key(|(p, _)| std::cmp::Reverse(p.as_str().len()));
        ClassRules { rules: all }
    }

    /// [`new`](ClassRules::new), refusing two rules that give one prefix different classes
    /// (`--class a=memory --class a=volatile`): which one was meant cannot be told, so the
    /// server does not guess. The same rule given twice is accepted.
    ///
    /// # Errors
    /// Two rules for one prefix name different classes; the message names both.
    pub fn checked(rules: Vec<(Key, Class)>) -> Result<ClassRules, String> {
        for (i, (prefix, class)) in rules.iter().enumerate() {
            if let Some((_, other)) = rules[..i].iter().find(|(p, c)| p == prefix && c != class) {
                return Err(format!(
                    "conflicting rules for prefix {prefix:?}: {prefix}={other} and {prefix}={class}; give each prefix one class"
                ));
            }
        }
        Ok(ClassRules::new(rules))
    }

    /// Parses one `PREFIX=CLASS` rule.
    ///
    /// # Errors
    /// The text is not `PREFIX=CLASS`, the prefix is not a key, or the class is unknown.
    pub fn parse_rule(text: &str) -> Result<(Key, Class), String> {
        let (prefix, class) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?} is not PREFIX=CLASS"))?;
        let prefix = Key::parse(prefix).map_err(|e| format!("prefix {prefix:?}: {e}"))?;
        Ok((prefix, Class::parse(class)?))
    }

    /// The class of `key` by its prefix.
    pub fn class_of(&self, key: &Key) -> Class {
        self.rules
            .iter()
            .find(|(prefix, _)| key.is_within(prefix))
            .map_or(Class::Persistent, |(_, class)| *class)
    }

    /// Whether any rule chooses `class`.
    pub fn uses(&self, class: Class) -> bool {
        self.rules.iter().any(|(_, c)| *c == class)
    }

    /// The rules as `PREFIX=CLASS`, longest prefix first (for the start-up log).
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self.rules.iter().map(|(p, c)| format!("{p}={c}")).collect();
        parts.join(",")
    }

    /// Whether `target` may cover a key whose class is not `persistent` by its prefix.
    pub fn may_cover_transient(&self, target: &Target) -> bool {
        self.rules.iter().any(|(prefix, class)| {
            *class != Class::Persistent
                && match target {
                    Target::Pattern(Pattern::All) => true,
                    Target::Pattern(Pattern::Below(p)) => prefix.is_below(p) || p.is_within(prefix),
                    Target::Key(p) => prefix.is_within(p) || p.is_within(prefix),
                }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Key {
        Key::parse(k).unwrap()
    }

    #[test]
    fn the_longest_matching_prefix_wins() {
        let rules = ClassRules::new(vec![
            ClassRules::parse_rule("run=volatile").unwrap(),
            ClassRules::parse_rule("run.keep=persistent").unwrap(),
        ]);
        assert_eq!(rules.class_of(&key("runtime")), Class::Memory);
        assert_eq!(rules.class_of(&key("runtime.a.b")), Class::Memory);
        assert_eq!(rules.class_of(&key("runtimex")), Class::Persistent);
        assert_eq!(rules.class_of(&key("run")), Class::Volatile);
        assert_eq!(rules.class_of(&key("run.x")), Class::Volatile);
        assert_eq!(rules.class_of(&key("run.keep.x")), Class::Persistent);
        assert_eq!(rules.class_of(&key("other")), Class::Persistent);
        let off = ClassRules::new(vec![(key("runtime"), Class::Persistent)]);
        assert_eq!(off.class_of(&key("runtime.a")), Class::Persistent);
        assert!(!off.uses(Class::Memory));
    }

    #[test]
    fn rules_are_checked() {
        assert!(ClassRules::parse_rule("a.b").is_err());
        assert!(ClassRules::parse_rule("a..b=memory").is_err());
        assert!(ClassRules::parse_rule("a=disk").is_err());
        assert!(ClassRules::parse_rule("a=").is_err());
    }

    #[test]
    fn conflicting_duplicates_are_refused_identical_ones_accepted() {
        let rule = |t: &str| ClassRules::parse_rule(t).unwrap();
        let err = ClassRules::checked(vec![rule("a=memory"), rule("a=volatile")]).unwrap_err();
        assert!(
            err.contains("a=memory") && err.contains("a=volatile"),
            "{err}"
        );
        let same =
            ClassRules::checked(vec![rule("a=memory"), rule("b=volatile"), rule("a=memory")]);
        assert_eq!(same.unwrap().class_of(&key("a.x")), Class::Memory);
        // Overriding the default `runtime=memory` is not a conflict.
        let off = ClassRules::checked(vec![rule("runtime=persistent")]).unwrap();
        assert_eq!(off.class_of(&key("runtime.a")), Class::Persistent);
    }

    #[test]
    fn targets_that_may_cover_transient_keys() {
        let rules = ClassRules::default();
        let t = |s: &str| Target::parse(s).unwrap();
        assert!(rules.may_cover_transient(&t("*")));
        assert!(rules.may_cover_transient(&t("runtime")));
        assert!(rules.may_cover_transient(&t("runtime.*")));
        assert!(rules.may_cover_transient(&t("runtime.a")));
        assert!(!rules.may_cover_transient(&t("service")));
        assert!(!rules.may_cover_transient(&t("runtimex.*")));
    }
}
