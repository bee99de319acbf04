//! How add-ons read and write an event: [`EventAccess`].
//!
//! Two implementations: a parsed [`Map`] (simple; used by tests and tools), and [`RawEvent`],
//! which keeps each top-level member of the event as the raw JSON text it arrived as and parses
//! only the members an add-on reads or writes. The process stage uses `RawEvent`: building and
//! freeing a JSON tree for every member of every event was about a third of its cost (perf: freeing
//! ~18%, parsing ~15%), while add-
//! ons typically touch three or four members.

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::enrich::SkipReason;
use crate::path;

/// Reading and writing an event by dotted property path.
pub trait EventAccess {
    /// The string at `path`: `MissingInput` if absent or null, `Unparseable` if not a string.
    fn get_str(&mut self, path: &str) -> Result<Cow<'_, str>, SkipReason>;
    /// Writes `value` at `path` (creating objects), without overwriting a non-object on the way.
    fn set(&mut self, path: &str, value: Value) -> Result<(), SkipReason>;
    /// Like [`EventAccess::set`], with the value given as JSON text (a cached add-on output):
    /// where the event can keep the text as it is, no value tree is built or copied.
    fn set_json(&mut self, path: &str, json: &Arc<str>) -> Result<(), SkipReason> {
        set_parsed(self, path, json)
    }
    /// Removes the value at `path`, if there.
    fn remove(&mut self, path: &str);
}

/// [`EventAccess::set`] with `json` parsed into a value first.
fn set_parsed<E: EventAccess + ?Sized>(event: &mut E, path: &str, json: &str) -> Result<(), SkipReason> {
    let value = serde_json::from_str(json).map_err(|_| SkipReason::Unparseable)?;
    event.set(path, value)
}

fn as_str(value: Option<&Value>) -> Result<Cow<'_, str>, SkipReason> {
    match value {
        None | Some(Value::Null) => Err(SkipReason::MissingInput),
        Some(Value::String(s)) => Ok(Cow::Borrowed(s)),
        Some(_) => Err(SkipReason::Unparseable),
    }
}

impl EventAccess for Map<String, Value> {
    fn get_str(&mut self, path: &str) -> Result<Cow<'_, str>, SkipReason> {
        as_str(path::get(self, path))
    }

    fn set(&mut self, path: &str, value: Value) -> Result<(), SkipReason> {
        path::set(self, path, value).map_err(|_| SkipReason::OutputConflict)
    }

    fn remove(&mut self, path: &str) {
        path::remove(self, path);
    }
}

/// One top-level member of a [`RawEvent`].
#[derive(Debug)]
enum Member<'a> {
    /// As it arrived.
    Raw(&'a RawValue),
    /// Parsed because an add-on read into it or wrote into it.
    Parsed(Value),
    /// JSON text made here (the stamped `keen` without its add-ons) or shared with a cache (an
    /// add-on's output).
    Text(Arc<str>),
    /// Removed (`remove_ip_property`).
    Removed,
}

/// An event as a list of top-level members, raw until touched.
#[derive(Debug, Default)]
pub struct RawEvent<'a> {
    members: Vec<(Cow<'a, str>, Member<'a>)>,
}

impl<'a> RawEvent<'a> {
    /// Splits an event object into its top-level members, leaving out the member named `skip`
    /// (the event's own `keen`, which the stamped one replaces).
    pub fn parse(json: &'a [u8], skip: &str) -> Result<Self, serde_json::Error> {
        let pairs: Vec<(Cow<'a, str>, &'a RawValue)> = serde_json::from_slice::<RawPairs<'a>>(json)?.0;
        Ok(Self {
            members: pairs
                .into_iter()
                .filter(|(name, _)| name != skip)
                .map(|(name, raw)| (name, Member::Raw(raw)))
                .collect(),
        })
    }

    /// Splits an object into its members and takes the member named `take` out, raw.
    pub fn parse_taking(
        json: &'a [u8],
        take: &str,
    ) -> Result<(Self, Option<&'a RawValue>), serde_json::Error> {
        let pairs: Vec<(Cow<'a, str>, &'a RawValue)> = serde_json::from_slice::<RawPairs<'a>>(json)?.0;
        let mut taken = None;
        let mut members = Vec::with_capacity(pairs.len());
        for (name, raw) in pairs {
            if name == take {
                taken = Some(raw);
            } else {
                members.push((name, Member::Raw(raw)));
            }
        }
        Ok((Self { members }, taken))
    }

    /// Adds a member given as JSON text at the front.
    pub fn push_front_text(&mut self, name: &'a str, json: String) {
        self.members
            .insert(0, (Cow::Borrowed(name), Member::Text(Arc::from(json))));
    }

    /// The index of the member named `name` (the last one, if repeated: JSON parsers keep the
    /// last), parsed if `parse` is set.
    fn member(&mut self, name: &str, parse: bool) -> Result<Option<usize>, SkipReason> {
        let Some(index) = self
            .members
            .iter()
            .rposition(|(n, m)| n == name && !matches!(m, Member::Removed))
        else {
            return Ok(None);
        };
        if parse {
            let text = match &self.members[index].1 {
                Member::Raw(raw) => Some(raw.get()),
                Member::Text(text) => Some(&**text),
                _ => None,
            };
            if let Some(text) = text {
                let value: Value = serde_json::from_str(text).map_err(|_| SkipReason::Unparseable)?;
                self.members[index].1 = Member::Parsed(value);
            }
        }
        Ok(Some(index))
    }

    /// The event as JSON text.
    pub fn to_json(&self) -> String {
        let capacity = self.members.iter().map(|(n, _)| n.len() + 64).sum::<usize>() + 512;
        let mut out = Vec::with_capacity(capacity);
        out.push(b'{');
        let mut first = true;
        for (name, member) in &self.members {
            if matches!(member, Member::Removed) {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            // Writing a str or a Value into a Vec cannot fail.
            serde_json::to_writer(&mut out, name.as_ref()).expect("in-memory write");
            out.push(b':');
            match member {
                Member::Raw(raw) => out.extend_from_slice(raw.get().as_bytes()),
                Member::Text(text) => out.extend_from_slice(text.as_bytes()),
                Member::Parsed(value) => serde_json::to_writer(&mut out, value).expect("in-memory write"),
                Member::Removed => {}
            }
        }
        out.push(b'}');
        String::from_utf8(out).expect("JSON text is UTF-8")
    }
}

/// Deserialises an object into its (name, raw value) pairs, in order.
struct RawPairs<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for RawPairs<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Pairs;
        impl<'de> serde::de::Visitor<'de> for Pairs {
            type Value = RawPairs<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an event object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                let mut pairs = Vec::with_capacity(16);
                while let Some(name) = access.next_key::<Cow<'de, str>>()? {
                    pairs.push((name, access.next_value::<&'de RawValue>()?));
                }
                Ok(RawPairs(pairs))
            }
        }
        d.deserialize_map(Pairs)
    }
}

impl EventAccess for RawEvent<'_> {
    fn get_str(&mut self, path: &str) -> Result<Cow<'_, str>, SkipReason> {
        let (head, rest) = path.split_once('.').map_or((path, None), |(h, r)| (h, Some(r)));
        let Some(index) = self.member(head, rest.is_some())? else {
            return Err(SkipReason::MissingInput);
        };
        match (&self.members[index].1, rest) {
            (Member::Text(text), None) => match serde_json::from_str::<Option<String>>(text.as_ref()) {
                Ok(Some(text)) => Ok(Cow::Owned(text)),
                Ok(None) => Err(SkipReason::MissingInput),
                Err(_) => Err(SkipReason::Unparseable),
            },
            (Member::Raw(raw), None) => match serde_json::from_str::<Option<Cow<'_, str>>>(raw.get()) {
                Ok(Some(text)) => Ok(text),
                Ok(None) => Err(SkipReason::MissingInput),
                Err(_) => Err(SkipReason::Unparseable),
            },
            (Member::Parsed(value), None) => as_str(Some(value)),
            (Member::Parsed(Value::Object(map)), Some(rest)) => as_str(path::get(map, rest)),
            (Member::Parsed(_), Some(_)) => Err(SkipReason::MissingInput),
            (Member::Raw(_) | Member::Text(_) | Member::Removed, _) => Err(SkipReason::MissingInput),
        }
    }

    fn set(&mut self, path: &str, value: Value) -> Result<(), SkipReason> {
        let (head, rest) = path.split_once('.').map_or((path, None), |(h, r)| (h, Some(r)));
        match (self.member(head, rest.is_some())?, rest) {
            (None, None) => {
                self.members
                    .push((Cow::Owned(head.to_string()), Member::Parsed(value)));
                Ok(())
            }
            (None, Some(rest)) => {
                let mut object = Map::new();
                path::set(&mut object, rest, value).map_err(|_| SkipReason::OutputConflict)?;
                self.members.push((
                    Cow::Owned(head.to_string()),
                    Member::Parsed(Value::Object(object)),
                ));
                Ok(())
            }
            (Some(index), None) => {
                self.members[index].1 = Member::Parsed(value);
                Ok(())
            }
            (Some(index), Some(rest)) => match &mut self.members[index].1 {
                Member::Parsed(Value::Object(map)) => {
                    path::set(map, rest, value).map_err(|_| SkipReason::OutputConflict)
                }
                _ => Err(SkipReason::OutputConflict),
            },
        }
    }

    fn set_json(&mut self, path: &str, json: &Arc<str>) -> Result<(), SkipReason> {
        if path.contains('.') {
            return set_parsed(self, path, json);
        }
        // A top-level output keeps the shared text: written out as it is, never copied as a tree.
        match self.member(path, false)? {
            Some(index) => self.members[index].1 = Member::Text(json.clone()),
            None => self
                .members
                .push((Cow::Owned(path.to_string()), Member::Text(json.clone()))),
        }
        Ok(())
    }

    fn remove(&mut self, path: &str) {
        let (head, rest) = path.split_once('.').map_or((path, None), |(h, r)| (h, Some(r)));
        let Ok(Some(index)) = self.member(head, rest.is_some()) else {
            return;
        };
        match (rest, &mut self.members[index].1) {
            (None, member) => *member = Member::Removed,
            (Some(rest), Member::Parsed(Value::Object(map))) => {
                path::remove(map, rest);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// The raw representation reads, writes and removes exactly as the parsed one does.
    type Reads = Vec<Result<String, SkipReason>>;

    fn both(event: &Value, ops: &[(&str, &str)]) -> (Value, Value, Reads, Reads) {
        let mut map = event.as_object().unwrap().clone();
        let text = event.to_string();
        let mut raw = RawEvent::parse(text.as_bytes(), "keen").unwrap();
        map.remove("keen");
        let (mut reads_map, mut reads_raw) = (Vec::new(), Vec::new());
        for (op, path) in ops {
            match *op {
                "get" => {
                    reads_map.push(map.get_str(path).map(|c| c.into_owned()));
                    reads_raw.push(raw.get_str(path).map(|c| c.into_owned()));
                }
                "set" => {
                    let a = map.set(path, json!({"v": 1}));
                    let b = raw.set(path, json!({"v": 1}));
                    assert_eq!(a, b, "set {path}");
                }
                "set_json" => {
                    let json: Arc<str> = Arc::from(r#"{"w":[1,"x"],"o":{"p":true}}"#);
                    let a = map.set_json(path, &json);
                    let b = raw.set_json(path, &json);
                    assert_eq!(a, b, "set_json {path}");
                }
                _ => {
                    EventAccess::remove(&mut map, path);
                    raw.remove(path);
                }
            }
        }
        let raw_value: Value = serde_json::from_str(&raw.to_json()).unwrap();
        (Value::Object(map), raw_value, reads_map, reads_raw)
    }

    #[test]
    fn raw_events_behave_like_parsed_ones() {
        let event = json!({"ip": "1.2.3.4", "page": {"url": "https://a.b/c", "n": 1}, "s": "t\"q",
                           "num": 5, "nul": null, "keen": {"addons": []}, "ref": {"url": ""},
                           "deep": {"a": {"b": "c\"q\u{e9}", "n": null}, "s": "x"}});
        let ops = [
            ("get", "ip"),
            ("get", "page.url"),
            ("get", "s"),
            ("get", "num"),
            ("get", "nul"),
            ("get", "none"),
            ("get", "page.n"),
            ("get", "ip.x"),
            ("get", "nul.x"),
            ("get", "num.x"),
            ("get", "deep.a.b"),
            ("get", "deep.a.n"),
            ("get", "deep.a"),
            ("get", "deep.a.b.c"),
            ("get", "deep.s"),
            ("get", "deep.z.b"),
            ("set", "geo"),
            ("set", "ref.info"),
            ("set", "ip.x"),
            ("set", "a.b.c"),
            ("remove", "ip"),
            ("remove", "page.n"),
            ("get", "ip"),
            ("get", "a.b.c.v"),
            ("set_json", "ua"),
            ("set_json", "s"),
            ("set_json", "page.parsed"),
            ("set", "ua.o.q"),
            ("get", "ua.o.p"),
            ("set_json", "nul.x"),
        ];
        let (map, raw, reads_map, reads_raw) = both(&event, &ops);
        assert_eq!(reads_map, reads_raw);
        assert_eq!(map, raw);
    }

    proptest! {
        #[test]
        fn raw_events_round_trip(keys in prop::collection::vec("[a-z]{1,3}", 0..6), values in prop::collection::vec(any::<i64>(), 6)) {
            let mut object = Map::new();
            for (k, v) in keys.iter().zip(&values) {
                object.insert(k.clone(), json!({"x": v, "s": format!("{v}\u{e9}\"")}));
            }
            let event = Value::Object(object);
            let text = event.to_string();
            let raw = RawEvent::parse(text.as_bytes(), "keen").unwrap();
            let back: Value = serde_json::from_str(&raw.to_json()).unwrap();
            prop_assert_eq!(back, event);
        }
    }
}
