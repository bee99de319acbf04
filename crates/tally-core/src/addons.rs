//! Keen's data enrichment add-ons: the closed set of names and the validation of a spec.
//!
//! An event asks for enrichment with
//! `"keen": {"addons": [{"name": "keen:ip_to_geo", "input": {"ip": "ip_address"}, "output": "geo"}]}`.
//! Ingest checks each spec here (known name, required inputs present as property paths, output a
//! valid path not under `keen.`) and carries it with the event; the process stage applies it.

use serde_json::Value;

use crate::names::check_property_path;

/// The add-ons Tally knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddonKind {
    /// `keen:ip_to_geo`: IP address to city, region, country and coordinates.
    IpToGeo,
    /// `keen:ua_parser`: user-agent string to device, browser and OS.
    UaParser,
    /// `keen:url_parser`: URL to protocol, domain, path, anchor and query parameters.
    UrlParser,
    /// `keen:referrer_parser`: referrer and page URLs to medium, source and search term.
    ReferrerParser,
    /// `keen:date_time_parser`: ISO timestamp to its calendar parts.
    DateTimeParser,
}

impl AddonKind {
    /// Every add-on.
    pub const ALL: [AddonKind; 5] = [
        AddonKind::IpToGeo,
        AddonKind::UaParser,
        AddonKind::UrlParser,
        AddonKind::ReferrerParser,
        AddonKind::DateTimeParser,
    ];

    /// The position of this add-on in [`AddonKind::ALL`], for per-add-on arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The wire name, e.g. `keen:ip_to_geo`.
    pub fn name(self) -> &'static str {
        match self {
            AddonKind::IpToGeo => "keen:ip_to_geo",
            AddonKind::UaParser => "keen:ua_parser",
            AddonKind::UrlParser => "keen:url_parser",
            AddonKind::ReferrerParser => "keen:referrer_parser",
            AddonKind::DateTimeParser => "keen:date_time_parser",
        }
    }

    /// The add-on with wire name `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// The `input` keys that must name a property path.
    pub fn required_inputs(self) -> &'static [&'static str] {
        match self {
            AddonKind::IpToGeo => &["ip"],
            AddonKind::UaParser => &["ua_string"],
            AddonKind::UrlParser => &["url"],
            AddonKind::ReferrerParser => &["referrer_url", "page_url"],
            AddonKind::DateTimeParser => &["date_time"],
        }
    }
}

/// Checks the value of `keen.addons`: a list of add-on specs. The error names the bad spec.
pub fn check_addons(value: &Value) -> Result<(), String> {
    let Value::Array(specs) = value else {
        return Err("keen.addons must be a list of add-on objects.".into());
    };
    for (index, spec) in specs.iter().enumerate() {
        check_addon(spec).map_err(|e| format!("keen.addons[{index}]: {e}"))?;
    }
    Ok(())
}

fn check_addon(spec: &Value) -> Result<(), String> {
    let Value::Object(spec) = spec else {
        return Err("an add-on must be an object with name, input and output.".into());
    };
    let name = spec
        .get("name")
        .and_then(Value::as_str)
        .ok_or("an add-on needs a string 'name'.")?;
    let kind = AddonKind::from_name(name).ok_or_else(|| {
        let known: Vec<_> = AddonKind::ALL.iter().map(|k| k.name()).collect();
        format!("unknown add-on '{name}'; known add-ons are {}.", known.join(", "))
    })?;
    let Some(Value::Object(input)) = spec.get("input") else {
        return Err(format!("{name} needs an 'input' object."));
    };
    for key in kind.required_inputs() {
        match input.get(*key) {
            Some(Value::String(path)) => {
                check_property_path(path).map_err(|e| format!("{name} input '{key}': {e}"))?
            }
            Some(_) => return Err(format!("{name} input '{key}' must be a property name string.")),
            None => return Err(format!("{name} needs input '{key}'.")),
        }
    }
    if kind == AddonKind::IpToGeo
        && input
            .get("remove_ip_property")
            .is_some_and(|remove| !remove.is_boolean())
    {
        return Err(format!(
            "{name} input 'remove_ip_property' must be true or false."
        ));
    }
    let output = spec
        .get("output")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{name} needs a string 'output' property path."))?;
    check_property_path(output).map_err(|e| format!("{name} output: {e}"))?;
    if output == "keen" || output.starts_with("keen.") {
        return Err(format!("{name} output must not be under 'keen'."));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn index_is_the_position_in_all() {
        for (position, kind) in AddonKind::ALL.into_iter().enumerate() {
            assert_eq!(kind.index(), position, "{kind:?}");
        }
    }

    #[test]
    fn accepts_every_documented_addon() {
        let specs = json!([
            {"name": "keen:ip_to_geo", "input": {"ip": "ip_address", "remove_ip_property": true}, "output": "geo"},
            {"name": "keen:ua_parser", "input": {"ua_string": "ua"}, "output": "parsed.ua"},
            {"name": "keen:url_parser", "input": {"url": "page.url"}, "output": "parsed_url"},
            {"name": "keen:referrer_parser", "input": {"referrer_url": "r", "page_url": "p"}, "output": "ref"},
            {"name": "keen:date_time_parser", "input": {"date_time": "keen.timestamp"}, "output": "time.utc"}
        ]);
        assert_eq!(check_addons(&specs), Ok(()));
    }

    #[test]
    fn refuses_specs_that_cannot_work() {
        let cases = [
            json!({"name": "keen:nope", "input": {}, "output": "x"}),
            json!({"name": "keen:ip_to_geo", "input": {}, "output": "x"}),
            json!({"name": "keen:ip_to_geo", "input": {"ip": 5}, "output": "x"}),
            json!({"name": "keen:ip_to_geo", "input": {"ip": "ip"}, "output": "keen.geo"}),
            json!({"name": "keen:ip_to_geo", "input": {"ip": "ip"}}),
            json!({"name": "keen:referrer_parser", "input": {"referrer_url": "r"}, "output": "x"}),
            json!({"name": "keen:ip_to_geo", "input": {"ip": "ip", "remove_ip_property": "yes"}, "output": "x"}),
            json!("keen:ip_to_geo"),
        ];
        for spec in cases {
            assert!(check_addons(&json!([spec])).is_err(), "{spec}");
        }
        assert!(check_addons(&json!({"name": "keen:ip_to_geo"})).is_err());
    }
}
