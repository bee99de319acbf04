//! Applying an event's `keen.addons`, in order, and removing them from the stored event.
//!
//! An add-on whose input property is missing or cannot be parsed leaves its output out; the event
//! is stored anyway and the skip is counted by add-on and reason
//! (`tally_enrich_skipped_total{addon, reason}`). Without a GeoIP database `ip_to_geo` is skipped
//! with reason `no_database`, and one warning says so.

use std::net::IpAddr;
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
use crate::geo::{GeoDatabase, GeoIp, GeoLookup};
use crate::referrer::ReferrerParser;
use crate::urlparse::parse_url;
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
        self.enrich_with(event, &raw, geo);
    }

    /// Applies `addons` (the raw JSON of a `keen.addons` list, already taken out of the event) in
    /// order. The specs are read into borrowed structs, not a JSON tree.
    pub fn enrich_with<E: EventAccess>(&self, event: &mut E, addons: &RawValue, geo: Option<&GeoDatabase>) {
        let specs: Vec<Spec<'_>> = match serde_json::from_str(addons.get()) {
            Ok(specs) => specs,
            Err(_) => {
                self.skip("unknown", SkipReason::InvalidSpec);
                return;
            }
        };
        for spec in &specs {
            self.apply(event, spec, geo);
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

    fn apply<E: EventAccess>(&self, event: &mut E, spec: &Spec<'_>, geo: Option<&GeoDatabase>) {
        let Some(kind) = AddonKind::from_name(&spec.name) else {
            self.skip("unknown", SkipReason::InvalidSpec);
            return;
        };
        let input = &spec.input;
        let outcome = match kind {
            AddonKind::IpToGeo => self.ip_to_geo(event, input.ip.as_deref(), geo).map(Output::Json),
            AddonKind::UaParser => read_str(event, input.ua_string.as_deref())
                .and_then(|ua| self.ua.parse_json(&ua).map_err(|_| SkipReason::Unparseable))
                .map(Output::Json),
            AddonKind::UrlParser => read_str(event, input.url.as_deref())
                .and_then(|url| parse_url(&url).ok_or(SkipReason::Unparseable))
                .map(Output::Value),
            AddonKind::ReferrerParser => read_str(event, input.referrer_url.as_deref())
                .map(Cow::into_owned)
                .and_then(|referrer| {
                    let page = read_str(event, input.page_url.as_deref())?;
                    self.referrer
                        .parse(&referrer, &page)
                        .ok_or(SkipReason::Unparseable)
                })
                .map(Output::Value),
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
        match geo.lookup(ip) {
            GeoLookup::Found(found) => Ok(found),
            GeoLookup::NotFound => Err(SkipReason::NotFound),
        }
    }
}

/// One add-on spec, borrowed from the log record. Ingest checked it; unknown input keys are
/// ignored.
#[derive(Debug, Deserialize)]
pub struct Spec<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow, default)]
    input: Inputs<'a>,
    #[serde(borrow)]
    output: Cow<'a, str>,
}

/// The input keys of all add-ons.
#[derive(Debug, Default, Deserialize)]
struct Inputs<'a> {
    #[serde(borrow, default)]
    ip: Option<Cow<'a, str>>,
    #[serde(default)]
    remove_ip_property: Option<bool>,
    #[serde(borrow, default)]
    ua_string: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    url: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    referrer_url: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    page_url: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    date_time: Option<Cow<'a, str>>,
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
