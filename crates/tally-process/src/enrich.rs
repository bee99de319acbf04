//! Applying an event's `keen.addons`, in order, and removing them from the stored event.
//!
//! An add-on whose input property is missing or cannot be parsed leaves its output out; the event
//! is stored anyway and the skip is counted by add-on and reason
//! (`tally_enrich_skipped_total{addon, reason}`). Without a GeoIP database `ip_to_geo` is skipped
//! with reason `no_database`, and one warning says so.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tally_core::addons::AddonKind;

use crate::access::EventAccess;
use crate::datetime::parse_date_time;
use crate::geo::{GeoDatabase, GeoIp, GeoLookup, GeoRecordCache};
use crate::referrer::{ReferrerParser, ReferrerSide};
use crate::urlparse::url_json;
use crate::useragent::UaParser;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AddonLabels {
    addon: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SkipLabels {
    addon: &'static str,
    reason: &'static str,
}

/// Why an add-on produced no output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The input property is not in the event.
    MissingInput,
    /// The input is there but is not what the add-on reads (not an IP, not a URL, ...).
    Unparseable,
    /// The IP address is in no GeoIP database.
    NotFound,
    /// No GeoIP database is configured.
    NoDatabase,
    /// Something in the event is in the way of the output path.
    OutputConflict,
    /// The add-on spec in the log is not one ingest would accept.
    InvalidSpec,
}

impl SkipReason {
    fn label(self) -> &'static str {
        match self {
            SkipReason::MissingInput => "missing_input",
            SkipReason::Unparseable => "unparseable",
            SkipReason::NotFound => "not_found",
            SkipReason::NoDatabase => "no_database",
            SkipReason::OutputConflict => "output_conflict",
            SkipReason::InvalidSpec => "invalid_spec",
        }
    }
}

/// The five add-ons and their shared state.
#[derive(Debug)]
pub struct Enrichers {
    geo: GeoIp,
    ua: UaParser,
    referrer: ReferrerParser,
    /// Outputs written, one counter per add-on in [`AddonKind::ALL`] order, looked up once here
    /// instead of hashing labels under the family's lock for every event.
    applied: [Counter; AddonKind::ALL.len()],
    skipped: Family<SkipLabels, Counter>,
    warned_no_geo: AtomicBool,
}

impl Enrichers {
    /// The add-ons, with `geo` as the GeoIP database, registering their metrics.
    pub fn new(geo: GeoIp, registry: &mut Registry) -> Self {
        let applied = Family::<AddonLabels, Counter>::default();
        let enrichers = Self {
            geo,
            ua: UaParser::new(),
            referrer: ReferrerParser::new(),
            applied: AddonKind::ALL
                .map(|kind| applied.get_or_create(&AddonLabels { addon: kind.name() }).clone()),
            skipped: Family::default(),
            warned_no_geo: AtomicBool::new(false),
        };
        registry.register(
            "tally_enrich_applied",
            "Add-on outputs written, by add-on",
            applied,
        );
        registry.register(
            "tally_enrich_skipped",
            "Add-ons that produced no output, by add-on and reason",
            enrichers.skipped.clone(),
        );
        enrichers
    }

    /// The GeoIP database holder (for reloads).
    pub fn geo(&self) -> &GeoIp {
        &self.geo
    }

    /// The user-agent parser.
    pub fn user_agents(&self) -> &UaParser {
        &self.ua
    }

    /// Applies the event's `keen.addons` in order and removes them. `geo` is the database for
    /// this batch (from [`GeoIp::current`]).
    pub fn enrich(&self, event: &mut Map<String, Value>, geo: Option<&GeoDatabase>) {
        let Some(Value::Object(keen)) = event.get_mut("keen") else {
            return;
        };
        let Some(addons) = keen.remove("addons") else {
            return;
        };
        let Ok(raw) = serde_json::value::to_raw_value(&addons) else {
            return;
        };
        self.enrich_with(event, &raw, geo, &mut EnrichMemo::default());
    }

    /// Applies `addons` (the raw JSON of a `keen.addons` list, already taken out of the event) in
    /// order. `memo` is the calling thread's memory of recent add-on work.
    pub fn enrich_with<E: EventAccess>(
        &self,
        event: &mut E,
        addons: &RawValue,
        geo: Option<&GeoDatabase>,
        memo: &mut EnrichMemo,
    ) {
        let Some(specs) = memo.specs(addons.get()) else {
            self.skip("unknown", SkipReason::InvalidSpec);
            return;
        };
        for spec in specs.iter() {
            self.apply(event, spec, geo, memo);
        }
    }

    fn skip(&self, addon: &'static str, reason: SkipReason) {
        self.skipped
            .get_or_create(&SkipLabels {
                addon,
                reason: reason.label(),
            })
            .inc();
    }

    fn apply<E: EventAccess>(
        &self,
        event: &mut E,
        spec: &Spec,
        geo: Option<&GeoDatabase>,
        memo: &mut EnrichMemo,
    ) {
        let Some(kind) = AddonKind::from_name(&spec.name) else {
            self.skip("unknown", SkipReason::InvalidSpec);
            return;
        };
        let input = &spec.input;
        let outcome = match kind {
            AddonKind::IpToGeo => self
                .ip_to_geo(event, input.ip.as_deref(), geo, &mut memo.geo)
                .map(Output::Json),
            AddonKind::UaParser => read_str(event, input.ua_string.as_deref())
                .and_then(|ua| self.ua.parse_json(&ua).map_err(|_| SkipReason::Unparseable))
                .map(Output::Json),
            AddonKind::UrlParser => read_str(event, input.url.as_deref())
                .and_then(|url| memo.url(&url).and_then(url_json).ok_or(SkipReason::Unparseable))
                .map(Output::Json),
            // Both inputs are read before either is parsed, so a missing page input is reported
            // as such whatever the referrer holds.
            AddonKind::ReferrerParser => read_str(event, input.referrer_url.as_deref())
                .map(Cow::into_owned)
                .and_then(|referrer| {
                    let page = read_str(event, input.page_url.as_deref())?;
                    let side = memo
                        .referrer_side(&self.referrer, &referrer)
                        .ok_or(SkipReason::Unparseable)?;
                    Ok(self.referrer.classify(&side, memo.url(&page)))
                })
                .map(Output::Json),
            AddonKind::DateTimeParser => read_str(event, input.date_time.as_deref())
                .and_then(|text| parse_date_time(&text).ok_or(SkipReason::Unparseable))
                .map(Output::Value),
        };
        let name = kind.name();
        let result = outcome.and_then(|output| match output {
            Output::Value(value) => event.set(&spec.output, value),
            Output::Json(json) => event.set_json(&spec.output, &json),
        });
        match result {
            Ok(()) => {
                self.applied[kind.index()].inc();
            }
            Err(reason) => self.skip(name, reason),
        }
        if let (AddonKind::IpToGeo, Some(true), Some(ip_path)) = (kind, input.remove_ip_property, &input.ip) {
            event.remove(ip_path);
        }
    }

    fn ip_to_geo<E: EventAccess>(
        &self,
        event: &mut E,
        ip_path: Option<&str>,
        geo: Option<&GeoDatabase>,
        cache: &mut GeoRecordCache,
    ) -> Result<std::sync::Arc<str>, SkipReason> {
        let text = read_str(event, ip_path)?;
        let ip: IpAddr = text.trim().parse().map_err(|_| SkipReason::Unparseable)?;
        let Some(geo) = geo else {
            if !self.warned_no_geo.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "events ask for keen:ip_to_geo but no GeoIP database is configured (--geoip-db); they are stored without it"
                );
            }
            return Err(SkipReason::NoDatabase);
        };
        match geo.lookup_cached(ip, cache) {
            GeoLookup::Found(found) => Ok(found),
            GeoLookup::NotFound => Err(SkipReason::NotFound),
        }
    }
}

/// One add-on spec as read from a log record. Ingest checked it; unknown input keys are
/// ignored.
#[derive(Debug, Deserialize)]
pub struct Spec {
    name: String,
    #[serde(default)]
    input: Inputs,
    output: String,
}

/// The input keys of all add-ons.
#[derive(Debug, Default, Deserialize)]
struct Inputs {
    #[serde(default)]
    ip: Option<String>,
    #[serde(default)]
    remove_ip_property: Option<bool>,
    #[serde(default)]
    ua_string: Option<String>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    referrer_url: Option<String>,
    #[serde(default)]
    page_url: Option<String>,
    #[serde(default)]
    date_time: Option<String>,
}

/// What one enrichment thread remembers between events, so that work repeated from event to
/// event is done once. Each thread keeps its own (no locks, nothing shared); every part is
/// bounded. Measured on `gen_events.py --addons` events, parsing each event's add-on list was
/// an eighth of the stage's time, URL parsing (three per event: page for `url_parser`, page and
/// referrer for `referrer_parser`) about a tenth, and decoding GeoIP records that many addresses
/// share most of `ip_to_geo`'s.
#[derive(Debug, Default)]
pub struct EnrichMemo {
    /// Recently seen `keen.addons` lists, as text, with their parsed specs: an application
    /// sends the same list with every event, so this is almost always a hit.
    specs: Vec<(Box<str>, Arc<[Spec]>)>,
    /// The last URL parsed (its trimmed text): `url_parser` and `referrer_parser` usually read
    /// the same page URL one after the other.
    last_url: Option<(String, Option<url::Url>)>,
    /// What each recent referrer URL says on its own (`None`: not a URL with a host), shared
    /// so that a hit copies nothing.
    referrers: HashMap<Box<str>, Option<Arc<ReferrerSide>>>,
    /// Decoded GeoIP records (many addresses share a city's record).
    geo: GeoRecordCache,
}

impl EnrichMemo {
    /// How many add-on lists are remembered.
    const SPEC_LISTS: usize = 16;
    /// How many referrers are remembered before the memory starts again.
    const REFERRERS: usize = 4096;
    /// Longer add-on lists and referrer URLs are worked out every time, not remembered, so the
    /// memo stays within a few megabytes whatever events hold (an event may be 900 KB).
    const LONGEST_REMEMBERED: usize = 2048;

    /// The parsed specs of the add-on list `text`; `None` if it is not a list of specs.
    fn specs(&mut self, text: &str) -> Option<Arc<[Spec]>> {
        if let Some((_, specs)) = self.specs.iter().find(|(seen, _)| **seen == *text) {
            return Some(specs.clone());
        }
        let specs: Arc<[Spec]> = serde_json::from_str::<Vec<Spec>>(text).ok()?.into();
        if text.len() > Self::LONGEST_REMEMBERED {
            return Some(specs);
        }
        if self.specs.len() == Self::SPEC_LISTS {
            self.specs.remove(0);
        }
        self.specs.push((text.into(), specs.clone()));
        Some(specs)
    }

    /// `text` parsed as a URL (trimmed), reusing the last parse when it is the same text.
    fn url(&mut self, text: &str) -> Option<&url::Url> {
        let text = text.trim();
        if self.last_url.as_ref().is_none_or(|(seen, _)| seen != text) {
            self.last_url = Some((text.to_owned(), url::Url::parse(text).ok()));
        }
        self.last_url.as_ref().and_then(|(_, parsed)| parsed.as_ref())
    }

    /// What the referrer URL `text` says on its own, remembered unless the text is long (event
    /// data is untrusted: entries are bounded in size as well as in number).
    fn referrer_side(&mut self, parser: &ReferrerParser, text: &str) -> Option<Arc<ReferrerSide>> {
        if text.len() > Self::LONGEST_REMEMBERED {
            return parser.referrer_side(text).map(Arc::new);
        }
        if let Some(side) = self.referrers.get(text) {
            return side.clone();
        }
        if self.referrers.len() >= Self::REFERRERS {
            self.referrers.clear();
        }
        let side = parser.referrer_side(text).map(Arc::new);
        self.referrers.insert(text.into(), side.clone());
        side
    }
}

/// What an add-on made: a value, or JSON text shared with a cache.
enum Output {
    Value(Value),
    Json(std::sync::Arc<str>),
}

/// The string property an add-on input names.
fn read_str<'e, E: EventAccess>(event: &'e mut E, path: Option<&str>) -> Result<Cow<'e, str>, SkipReason> {
    event.get_str(path.ok_or(SkipReason::InvalidSpec)?)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::json;

    use super::*;

    /// What a thread remembers must never change an event's result: every event enriched with
    /// one memo kept across all of them equals the same event enriched with a fresh memo. The
    /// events alternate pages and referrers (so the last-URL memory misses and hits), use more
    /// add-on lists than are remembered (so lists are forgotten and parsed again), and include
    /// referrers that are not URLs.
    #[test]
    fn memoised_enrichment_equals_fresh_enrichment() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/testdata/geoip/GeoIP2-City-Test.mmdb");
        let enrichers = Enrichers::new(GeoIp::open(vec![path]).unwrap(), &mut Registry::default());
        let geo = enrichers.geo().current();
        let pages = [
            "https://shop.example.com/a?utm_source=news&x=1",
            "https://shop.example.com/b?gclid=abc",
            "http://other.example/p#frag",
            "not a url",
        ];
        let referrers = [
            "https://www.google.com/search?q=event+analytics",
            "https://t.co/abc123",
            "https://shop.example.com/docs",
            "",
            "garbage",
            "https://mail.google.com/mail/u/0/",
        ];
        let mut memo = EnrichMemo::default();
        for i in 0..200usize {
            let list = i % (EnrichMemo::SPEC_LISTS + 4);
            let addons = json!([
                {"name": "keen:ip_to_geo", "input": {"ip": "ip"}, "output": format!("geo{list}")},
                {"name": "keen:url_parser", "input": {"url": "page.url"}, "output": "parsed_page"},
                {"name": "keen:referrer_parser",
                 "input": {"referrer_url": "referrer", "page_url": "page.url"}, "output": "info"},
                {"name": "keen:url_parser", "input": {"url": "referrer"}, "output": "parsed_referrer"},
            ]);
            let event = json!({
                "ip": "81.2.69.142",
                "page": {"url": pages[i % pages.len()]},
                "referrer": referrers[i % referrers.len()],
            });
            let raw = serde_json::value::to_raw_value(&addons).unwrap();
            let mut memoised = event.as_object().unwrap().clone();
            enrichers.enrich_with(&mut memoised, &raw, geo.as_deref(), &mut memo);
            let mut fresh = event.as_object().unwrap().clone();
            enrichers.enrich_with(&mut fresh, &raw, geo.as_deref(), &mut EnrichMemo::default());
            assert_eq!(memoised, fresh, "event {i}");
            assert!(
                memoised.contains_key(&format!("geo{list}")),
                "event {i}: {memoised:?}"
            );
        }
        assert!(memo.specs.len() <= EnrichMemo::SPEC_LISTS);
        assert!(!memo.referrers.is_empty());
        // A long referrer is classified but not remembered.
        let long = format!(
            "https://www.google.com/search?q={}",
            "a".repeat(EnrichMemo::LONGEST_REMEMBERED)
        );
        let before = memo.referrers.len();
        assert!(memo.referrer_side(&enrichers.referrer, &long).is_some());
        assert_eq!(memo.referrers.len(), before);
    }
}

#[cfg(test)]
mod skip_tests {
    use serde_json::json;

    use super::*;

    /// `referrer_parser` reads both inputs before parsing either: with no page input, the skip
    /// is `missing_input` even when the referrer is not a URL (direct traffic's empty referrer).
    #[test]
    fn a_missing_page_input_is_missing_whatever_the_referrer() {
        let enrichers = Enrichers::new(GeoIp::none(), &mut Registry::default());
        let addons = json!([{"name": "keen:referrer_parser",
                             "input": {"referrer_url": "ref", "page_url": "page"}, "output": "info"}]);
        let raw = serde_json::value::to_raw_value(&addons).unwrap();
        let mut event = json!({"ref": ""}).as_object().unwrap().clone();
        enrichers.enrich_with(&mut event, &raw, None, &mut EnrichMemo::default());
        let count = |reason| {
            enrichers
                .skipped
                .get_or_create(&SkipLabels {
                    addon: "keen:referrer_parser",
                    reason,
                })
                .get()
        };
        assert_eq!((count("missing_input"), count("unparseable")), (1, 0));
    }
}
