//! The pages as HTML. maud escapes every spliced value, so nothing the API
//! server returns can inject markup. No inline script or style: the CSP allows
//! only the embedded /assets files.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Event;
use kube::ResourceExt;
use maud::{DOCTYPE, Markup, html};

use super::{
    form::{Choices, FieldRule, NewKey},
    view::{self, Attention, KeyRow, ListPage, ListQuery, State},
};
use crate::{
    crd::ApiKey,
    policy::{ApiKeyPolicy, crd::PolicyViolationEntry},
};

/// What every page's frame needs.
pub struct Frame<'a> {
    /// The caller's CSRF token, put in every form.
    pub csrf: &'a str,
    /// The API server the dashboard talks to, shown in the header.
    pub server: &'a str,
}

/// The page frame: header, navigation, the body.
pub fn layout(frame: &Frame, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="same-origin";
                title { (title) " · keyward" }
                link rel="stylesheet" href="/assets/dashboard.css";
                script src="/assets/dashboard.js" defer {}
            }
            body {
                header {
                    a.brand href="/" { "keyward" }
                    nav {
                        a href="/" { "Keys" }
                        a href="/policies" { "Policies" }
                        a.button href="/new" { "New key" }
                    }
                    span.server title="API server" { (frame.server) }
                }
                main { (body) }
            }
        }
    }
}

fn time(at: Option<Timestamp>, now: Timestamp, none: &str) -> Markup {
    match at {
        Some(at) => html! { time datetime=(at) title=(at) { (view::relative(at, now)) } },
        None => html! { span.muted { (none) } },
    }
}

fn sparkline(values: &[i64]) -> Markup {
    let points = view::sparkline_points(values, 120.0, 24.0);
    let total: i64 = values.iter().sum();
    html! {
        svg.spark width="120" height="24" viewBox="0 0 120 24" role="img" aria-label=(format!("{total} requests in 30 days")) {
            @if !points.is_empty() { polyline points=(points) fill="none" stroke="currentColor" stroke-width="1.5" {} }
            @else { line x1="0" y1="23" x2="120" y2="23" stroke="currentColor" stroke-opacity="0.3" {} }
        }
    }
}

fn state_badge(state: &State) -> Markup {
    let class = match state {
        State::Ready => "ok",
        State::Pending | State::Revoking => "wait",
        State::NotReady { .. } => "bad",
    };
    let title = match state {
        State::NotReady { message, .. } => message.as_str(),
        _ => "",
    };
    html! { span class={"badge " (class)} title=(title) { (state.label()) } }
}

fn flags(attention: &[Attention]) -> Markup {
    html! { @for flag in attention { span.flag { (flag.label()) } " " } }
}

/// The namespace filter: `everything` first, then each namespace.
fn namespace_select(selected: Option<&str>, namespaces: &[String], everything: &str) -> Markup {
    html! {
        label { "Namespace "
            select name="ns" {
                option value="" selected[selected.is_none()] { (everything) }
                @for ns in namespaces { option value=(ns) selected[selected == Some(ns.as_str())] { (ns) } }
            }
        }
    }
}

fn key_href(namespace: &str, name: &str) -> String {
    format!("/keys/{namespace}/{name}")
}

fn list_href(query: &ListQuery, page: usize) -> String {
    let mut pairs = vec![("page", page.to_string())];
    if let Some(ns) = &query.namespace {
        pairs.push(("ns", ns.clone()));
    }
    if !query.search.is_empty() {
        pairs.push(("q", query.search.clone()));
    }
    if query.attention_only {
        pairs.push(("attention", "1".into()));
    }
    format!(
        "/?{}",
        serde_urlencoded::to_string(pairs).unwrap_or_default()
    )
}

/// The key list.
pub fn list(
    frame: &Frame,
    page: &ListPage,
    query: &ListQuery,
    namespaces: &[String],
    now: Timestamp,
) -> Markup {
    let body = html! {
        h1 { "API keys" }
        form.filters method="get" action="/" {
            (namespace_select(query.namespace.as_deref(), namespaces, "all shown"))
            label { "Search " input type="search" name="q" value=(query.search) placeholder="name, owner, team, scope"; }
            label { input type="checkbox" name="attention" value="1" checked[query.attention_only]; " needs attention only" }
            button type="submit" { "Filter" }
        }
        p.summary {
            (page.matched) " of " (page.total) " keys"
            @if page.needing_attention > 0 { ", " strong { (page.needing_attention) " need attention" } }
        }
        table.keys {
            thead { tr {
                th { "Name" } th { "Namespace" } th { "Owner" } th { "Team" } th { "Scopes" }
                th { "State" } th { "Created" } th { "Last used" } th { "Requests 24 h" } th { "30 days" }
                th { "Next rotation" } th { "Expires" } th { "Policy" }
            } }
            tbody {
                @for row in &page.rows { (list_row(row, now)) }
            }
        }
        @if page.pages > 1 {
            nav.pager {
                @if page.page > 0 { a href=(list_href(query, page.page - 1)) rel="prev" { "← previous" } }
                span { "page " (page.page + 1) " of " (page.pages) }
                @if page.page + 1 < page.pages { a href=(list_href(query, page.page + 1)) rel="next" { "next →" } }
            }
        }
    };
    layout(frame, "API keys", body)
}

fn list_row(row: &KeyRow, now: Timestamp) -> Markup {
    html! {
        tr.attention[!row.attention.is_empty()] data-key=(format!("{}/{}", row.namespace, row.name)) {
            td { a href=(key_href(&row.namespace, &row.name)) { (row.name) } br; (flags(&row.attention)) }
            td { (row.namespace) }
            td { (row.owner) }
            td { (row.team) }
            td { @for scope in &row.scopes { code { (scope) } " " } }
            td { (state_badge(&row.state)) }
            td { (time(row.created, now, "-")) }
            td.last-used { (time(row.last_used, now, "never")) }
            td.num { (row.requests_24h) }
            td { (sparkline(&row.daily)) }
            td { (time(row.next_rotation, now, "-")) }
            td { (time(row.expires, now, "never")) }
            td { @match &row.policy {
                None => span.muted { "-" },
                Some(Ok(())) => span.badge.ok { "ok" },
                Some(Err(policies)) => span.badge.bad title=(policies.join(", ")) { "violates " (policies.join(", ")) },
            } }
        }
    }
}

/// What a key's page offers, from the caller's RBAC.
pub struct KeyActions {
    /// The caller may read the key's Secret: "Reveal" is offered.
    pub reveal: bool,
}

/// A key's page.
pub fn key_page(
    frame: &Frame,
    key: &ApiKey,
    events: &[Event],
    actions: &KeyActions,
    notice: Option<&str>,
    now: Timestamp,
) -> Markup {
    let row = KeyRow::new(key, now);
    let status = key.status.clone().unwrap_or_default();
    let href = key_href(&row.namespace, &row.name);
    let rotation = key.spec.rotation.clone().unwrap_or_default();
    let body = html! {
        p.crumbs { a href=(format!("/?ns={}", row.namespace)) { (row.namespace) } " / " (row.name) }
        h1 { (row.name) " " (state_badge(&row.state)) }
        @if let Some(notice) = notice { p.notice role="status" { (notice) } }
        @if let State::Pending = row.state {
            // Refresh until the operator reports: a meta refresh needs no script.
            meta http-equiv="refresh" content="2";
            p.notice { "Waiting for the operator to issue the key…" }
        }
        @if let State::NotReady { reason, message } = &row.state { p.problem { strong { (reason) } ": " (message) } }
        @if !row.attention.is_empty() { p { "Needs attention: " (flags(&row.attention)) } }
        div.actions {
            @if actions.reveal && row.state == State::Ready {
                form method="post" action=(format!("{href}/reveal")) {
                    input type="hidden" name="csrf" value=(frame.csrf);
                    button id="reveal" type="submit" { "Reveal key" }
                }
            }
            a.button id="rotate" href=(format!("{href}/rotate")) { "Rotate" }
            a.button.danger id="emergency-rotate" href=(format!("{href}/rotate?emergency=1")) { "Emergency rotate" }
            a.button.danger id="revoke" href=(format!("{href}/revoke")) { "Revoke" }
        }
        section.facts {
            dl {
                dt { "Owner" } dd { (key.spec.owner) }
                dt { "Team" } dd { (key.spec.team) }
                dt { "Scopes" } dd { @for s in &key.spec.scopes { code { (s) } " " } }
                @if let Some(d) = &key.spec.description { dt { "Description" } dd { (d) } }
                dt { "Key" } dd { (status.key_hint.clone().unwrap_or_else(|| "-".into())) " " span.muted { (status.key_id.clone().unwrap_or_default()) } }
                dt { "Secret" } dd { code { (status.secret_name.clone().or_else(|| key.target_secret_name().map(str::to_owned)).unwrap_or_default()) } " in " (row.namespace) }
                dt { "Revision" } dd { (status.revision.map_or("-".into(), |r| r.to_string())) }
                dt { "Created" } dd { (time(row.created, now, "-")) }
                dt { "Issued" } dd { (time(status.issued_at.as_ref().map(|t| t.0), now, "-")) }
                dt { "Last used" } dd { (time(row.last_used, now, "never")) }
                dt { "Expires" } dd { (time(row.expires, now, "never")) }
            }
            dl {
                dt { "Rotation schedule" } dd { (rotation.schedule.clone().unwrap_or_else(|| "on request only".into())) }
                @if let Some(tz) = &rotation.time_zone { dt { "Time zone" } dd { (tz) } }
                dt { "Grace period" } dd { (rotation.grace_period.clone().unwrap_or_else(|| format!("{} (default)", crate::crd::DEFAULT_GRACE_PERIOD))) }
                dt { "Expires after" } dd { (key.spec.expires_after.clone().unwrap_or_else(|| "never".into())) }
                dt { "Last rotated" } dd { (time(status.last_rotated_at.as_ref().map(|t| t.0), now, "never")) }
                dt { "Next rotation" } dd { (time(row.next_rotation, now, "-")) }
                @if let Some(until) = &status.previous_key_expires_at { dt { "Previous key until" } dd { (time(Some(until.0), now, "-")) } }
                dt { "Restarts" } dd {
                    @match &key.spec.rollout {
                        Some(rollout) if !rollout.targets.is_empty() => {
                            @for t in &rollout.targets { code { (format!("{:?}", t.kind)) "/" (t.name) } " " }
                        }
                        _ => span.muted { "no workloads" },
                    }
                }
                dt { "Policy" } dd { @match &row.policy {
                    None => span.muted { "not checked yet" },
                    Some(Ok(())) => "compliant",
                    Some(Err(p)) => span.bad { "violates " (p.join(", ")) },
                } }
            }
        }
        section {
            h2 { "Usage" }
            @match &status.usage {
                None => p.muted { "No request recorded for any of its keys." },
                Some(usage) => {
                    p { (usage.last24h) " requests in the last 24 h (" (usage.refused_last24h) " refused), " (usage.last7d) " in the last 7 days." }
                    (usage_chart(&view::daily_by_outcome(&usage.daily, now), now))
                }
            }
        }
        section {
            h2 { "Conditions" }
            table { thead { tr { th { "Type" } th { "Status" } th { "Reason" } th { "Since" } th { "Message" } } }
                tbody { @for c in &status.conditions { tr {
                    td { (c.type_) } td { (c.status) } td { (c.reason) } td { (time(Some(c.last_transition_time.0), now, "-")) } td { (c.message) }
                } } }
            }
        }
        section {
            h2 { "Events" }
            @if events.is_empty() { p.muted { "No Events (the API server keeps them for an hour by default)." } }
            ol.timeline {
                @for e in events { li.warning[e.type_.as_deref() == Some("Warning")] {
                    (time(view::event_time(e), now, "-")) " "
                    strong { (e.reason.clone().unwrap_or_default()) }
                    @if e.count.unwrap_or(1) > 1 { " ×" (e.count.unwrap_or(1)) }
                    " " (e.message.clone().unwrap_or_default())
                } }
            }
        }
    };
    layout(frame, &row.name, body)
}

/// One bar segment of the usage chart.
struct Segment {
    outcome: usize,
    name: &'static str,
    count: i64,
    x: f64,
    y: f64,
    height: f64,
}

/// The segments of 30 stacked bars (one per day, one segment per outcome),
/// scaled to the busiest day, in a `width` by `height` box.
fn segments(series: &[(&'static str, Vec<i64>)], width: f64, height: f64) -> Vec<Segment> {
    let days = view::DAYS;
    let most = (0..days)
        .map(|i| series.iter().map(|(_, v)| v[i]).sum::<i64>())
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let bar = width / days as f64;
    let mut out = Vec::new();
    for day in 0..days {
        let mut top = height;
        for (outcome, (name, values)) in series.iter().enumerate() {
            if values[day] > 0 {
                let h = values[day] as f64 / most * height;
                top -= h;
                out.push(Segment {
                    outcome,
                    name,
                    count: values[day],
                    x: day as f64 * bar + 1.0,
                    y: top,
                    height: h,
                });
            }
        }
    }
    out
}

/// 30 stacked bars, one per UTC day, split by outcome.
fn usage_chart(series: &[(&'static str, Vec<i64>)], now: Timestamp) -> Markup {
    let bar = 600.0 / view::DAYS as f64 - 2.0;
    let first_day = now - jiff::SignedDuration::from_hours(24 * (view::DAYS as i64 - 1));
    html! {
        figure.chart {
            svg id="usage-chart" width="600" height="140" viewBox="0 0 600 140" role="img" aria-label="requests per day for 30 days, by outcome" {
                @for s in segments(series, 600.0, 120.0) {
                    rect class={"o" (s.outcome)} x=(format!("{:.1}", s.x)) y=(format!("{:.1}", s.y)) width=(format!("{bar:.1}")) height=(format!("{:.1}", s.height)) {
                        title { (s.name) ": " (s.count) }
                    }
                }
                text x="0" y="136" { (first_day.strftime("%b %d")) }
                text x="600" y="136" text-anchor="end" { "today" }
            }
            figcaption {
                @for (n, (name, values)) in series.iter().enumerate() {
                    span class={"legend o" (n)} { (name) " " (values.iter().sum::<i64>()) } " "
                }
            }
        }
    }
}

/// The confirmation before a rotation, saying what will break.
pub fn confirm_rotate(frame: &Frame, key: &ApiKey, emergency: bool) -> Markup {
    let name = key.name_any();
    let namespace = key.namespace().unwrap_or_default();
    let grace = key
        .spec
        .rotation
        .as_ref()
        .and_then(|r| r.grace_period.clone())
        .unwrap_or_else(|| crate::crd::DEFAULT_GRACE_PERIOD.into());
    let secret = key.target_secret_name().unwrap_or_default().to_owned();
    let body = html! {
        h1 { @if emergency { "Emergency rotate " } @else { "Rotate " } (name) }
        p { "keyward issues a new key and writes it into Secret " code { (secret) } " in " (namespace) ". Workloads that read the Secret get the new key when they re-read it or restart." }
        @if emergency {
            p.problem { strong { "Every client still using the current or a previous key gets 401 at once." } " Use this after a leak. Workloads that have not picked up the new key stop working until they do." }
        } @else {
            p { "The current key keeps working for its grace period (" (grace) "), then clients still using it get 401." }
        }
        form method="post" {
            input type="hidden" name="csrf" value=(frame.csrf);
            @if emergency { input type="hidden" name="emergency" value="1"; }
            button.danger[emergency] id="confirm" type="submit" { @if emergency { "Revoke the old keys and rotate" } @else { "Rotate" } }
            " " a href=(key_href(&namespace, &name)) { "Cancel" }
        }
    };
    layout(frame, "Rotate", body)
}

/// The revocation dialog: the user types the key's name, as GitHub asks for a repository's.
pub fn confirm_revoke(frame: &Frame, key: &ApiKey, mistyped: bool) -> Markup {
    let name = key.name_any();
    let namespace = key.namespace().unwrap_or_default();
    let body = html! {
        h1 { "Revoke " (name) }
        p.problem { "This deletes the ApiKey. keyward revokes every key it issued for it, and every request with them gets 401 within a second. This cannot be undone." }
        @if mistyped { p.problem id="mistyped" { "The name you typed does not match." } }
        form method="post" {
            input type="hidden" name="csrf" value=(frame.csrf);
            label { "Type " strong { (name) } " to confirm " input id="confirm-name" type="text" name="confirm" autocomplete="off" required; }
            button.danger id="confirm" type="submit" { "Revoke this key" }
            " " a href=(key_href(&namespace, &name)) { "Cancel" }
        }
    };
    layout(frame, "Revoke", body)
}

/// After a revocation, or while it is still blocked.
pub fn revoked(frame: &Frame, namespace: &str, name: &str, outcome: Result<(), String>) -> Markup {
    let body = html! {
        @match outcome {
            Ok(()) => { h1 { "Revoked" } p id="revoked" { "apikey " (namespace) "/" (name) " revoked and deleted: its keys no longer verify." } }
            Err(why) => { h1 { "Still revoking" } p.problem { (why) } }
        }
        p { a href=(format!("/?ns={namespace}")) { "Back to the keys" } }
    };
    layout(frame, "Revoked", body)
}

/// The key itself, shown once on request: never stored, the response not cached.
pub fn revealed(frame: &Frame, namespace: &str, name: &str, secret: &str, key: &str) -> Markup {
    let body = html! {
        h1 { "Key for " (name) }
        p { "Copy it now: this page is not kept, and the key is shown only on request. It also lives in Secret " code { (secret) } " in " (namespace) ", data key " code { (crate::crd::SECRET_DATA_KEY) } "." }
        div.reveal {
            input id="key" type="text" readonly value=(key) size="60";
            button id="copy" type="button" data-copy="key" { "Copy" }
        }
        p { a href=(key_href(namespace, name)) { "Done" } }
    };
    layout(frame, "Key", body)
}

/// The create form, filled with what was typed, with the policies' choices and an error if any.
pub fn new_key(
    frame: &Frame,
    form: &NewKey,
    rules: &std::collections::BTreeMap<String, FieldRule>,
    choices: &Choices,
    namespaces: &[String],
    error: Option<&str>,
) -> Markup {
    let rule = |name: &str| rules.get(name).cloned().unwrap_or_default();
    let field = |label: &str, name: &str, path: &str, value: &str, required: bool| {
        let r = rule(path);
        html! {
            label { (label)
                input type="text" name=(name) value=(value) required[required]
                    pattern=[r.pattern.clone()] maxlength=[r.max_length] minlength=[r.min_length] title=(r.help);
                small { (r.help) }
            }
        }
    };
    let name_rule = r"^[a-z0-9]([\-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([\-a-z0-9]*[a-z0-9])?)*$";
    let scope_rule = rule("scopes");
    let body = html! {
        h1 { "New API key" }
        @if let Some(error) = error { p.problem id="error" role="alert" { (error) } }
        form.new method="post" action="/new" {
            input type="hidden" name="csrf" value=(frame.csrf);
            label { "Namespace"
                input type="text" name="namespace" value=(form.namespace) required list="namespaces" pattern="^[a-z0-9]([\\-a-z0-9]*[a-z0-9])?$" maxlength="63";
                datalist id="namespaces" { @for ns in namespaces { option value=(ns) {} } }
                small { "Change it and press Check to see the policies of another namespace." }
            }
            label { "Name" input type="text" name="name" value=(form.name) required pattern=(name_rule) maxlength="253"; small { "The ApiKey's name; the Secret gets it too unless you set one." } }
            (field("Owner", "owner", "owner", &form.owner, true))
            @match &choices.teams {
                Some(teams) if !teams.is_empty() => label { "Team"
                    select name="team" required { @for t in teams { option value=(t) selected[*t == form.team] { (t) } } }
                    small { "Teams allowed by " (choices.policies.join(", ")) "." }
                },
                _ => (field("Team", "team", "team", &form.team, true)),
            }
            fieldset { legend { "Scopes" }
                @if let Some(scopes) = &choices.scopes {
                    @for s in scopes {
                        label.check { input type="checkbox" name="scope" value=(s) checked[form.scopes.contains(s)]; " " code { (s) } }
                    }
                }
                @let extra: Vec<&String> = form.scopes.iter().filter(|s| !choices.scopes.as_ref().is_some_and(|c| c.contains(s))).collect();
                label { "Other scopes, comma-separated"
                    input type="text" name="extra_scopes" value=(extra.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")) title=(scope_rule.help);
                    small { (scope_rule.help) @if !choices.scope_patterns.is_empty() { " Allowed here: " (choices.scope_patterns.join(", ")) "." } }
                }
            }
            @if !choices.owner_patterns.is_empty() { p.muted { "Owners must match " @for p in &choices.owner_patterns { code { (p) } " " } } }
            @if !choices.lifetime.is_empty() { p.muted { "Limits here: " (choices.lifetime.join("; ")) } }
            (field("Description", "description", "description", &form.description, false))
            (field("Rotation schedule", "schedule", "rotation.schedule", &form.schedule, false))
            (field("Time zone", "time_zone", "rotation.timeZone", &form.time_zone, false))
            (field("Grace period", "grace_period", "rotation.gracePeriod", &form.grace_period, false))
            (field("Expires after", "expires_after", "expiresAfter", &form.expires_after, false))
            (field("Secret name", "secret_name", "secretName", &form.secret_name, false))
            div.actions {
                button id="check" type="submit" name="step" value="check" formnovalidate { "Check" }
                button id="preview" type="submit" name="step" value="preview" { "Show YAML" }
            }
        }
    };
    layout(frame, "New key", body)
}

/// The validated manifest to commit, and the offer to apply it now.
pub fn preview(frame: &Frame, form: &NewKey) -> Markup {
    let body = html! {
        h1 { "New API key " (form.name) }
        p { "The API server accepted this ApiKey in a dry run with your permissions. Commit it to Git for GitOps, or create it now." }
        pre id="yaml" { (form.yaml()) }
        form method="post" action="/new" {
            input type="hidden" name="csrf" value=(frame.csrf);
            @for (name, value) in hidden_fields(form) { input type="hidden" name=(name) value=(value); }
            button id="apply" type="submit" name="step" value="apply" { "Create it now" }
            " "
            button type="submit" name="step" value="edit" formnovalidate { "Edit" }
        }
    };
    layout(frame, "New key", body)
}

fn hidden_fields(form: &NewKey) -> Vec<(&'static str, String)> {
    let mut fields = vec![
        ("namespace", form.namespace.clone()),
        ("name", form.name.clone()),
        ("owner", form.owner.clone()),
        ("team", form.team.clone()),
        ("description", form.description.clone()),
        ("schedule", form.schedule.clone()),
        ("time_zone", form.time_zone.clone()),
        ("grace_period", form.grace_period.clone()),
        ("expires_after", form.expires_after.clone()),
        ("secret_name", form.secret_name.clone()),
    ];
    fields.extend(form.scopes.iter().map(|s| ("scope", s.clone())));
    fields
}

/// The ApiKeyPolicies, with what they allow and the keys that break them.
pub fn policies(
    frame: &Frame,
    namespace: Option<&str>,
    policies: &[(ApiKeyPolicy, Option<bool>)],
    namespaces: &[String],
) -> Markup {
    let body = html! {
        h1 { "Policies" }
        form.filters method="get" action="/policies" {
            (namespace_select(namespace, namespaces, "every policy"))
            button type="submit" { "Show" }
        }
        @if policies.is_empty() { p.muted { "No ApiKeyPolicy" @if namespace.is_some() { " selects this namespace" } "." } }
        @for (policy, selects) in policies {
            @let spec = &policy.spec;
            @let status = policy.status.clone().unwrap_or_default();
            section.policy {
                h2 { (policy.name_any()) @if *selects == Some(true) { " " span.badge.ok { "selects " (namespace.unwrap_or_default()) } } }
                dl {
                    dt { "Namespaces" } dd { code { (serde_json::to_string(&spec.namespace_selector).unwrap_or_default()) } " (" (status.namespaces) " now)" }
                    dt { "Teams" } dd { (policy_teams(policy)) }
                    dt { "Scopes" } dd { @match &spec.scopes { Some(r) => { @for s in &r.allowed { code { (s) } " " } }, None => "any" } }
                    dt { "Owner" } dd { @match &spec.owner { Some(r) => code { (r.pattern) }, None => "anyone" } }
                    @if let Some(l) = &spec.lifetime {
                        dt { "Lifetime" } dd { (serde_json::to_string(l).unwrap_or_default()) }
                    }
                    @if let Some(max) = spec.max_keys_per_namespace { dt { "Keys per namespace" } dd { "at most " (max) } }
                    dt { "On violation" } dd { (format!("{:?}", spec.on_violation)) }
                    dt { "Keys" } dd { (status.governed_keys) " governed, " (status.violating_keys) " violating" }
                }
                @if !status.violations.is_empty() { (violations(&status.violations)) }
            }
        }
    };
    layout(frame, "Policies", body)
}

fn policy_teams(policy: &ApiKeyPolicy) -> String {
    crate::policy::CompiledPolicy::new(policy)
        .teams_summary()
        .unwrap_or_else(|| "any".into())
}

fn violations(entries: &[PolicyViolationEntry]) -> Markup {
    html! {
        table { thead { tr { th { "Key" } th { "Rule" } th { "Message" } } }
            tbody { @for v in entries { tr {
                td { a href=(key_href(&v.namespace, &v.name)) { (v.namespace) "/" (v.name) } }
                td { (v.rule) } td { (v.message) }
            } } }
        }
    }
}

/// An error page: the API server's own message when it refused.
pub fn error(frame: &Frame, status: u16, message: &str) -> Markup {
    let body = html! {
        h1 { @if status == 403 { "Not allowed" } @else if status == 404 { "Not found" } @else { "Something went wrong" } }
        p.problem id="error" role="alert" { (message) }
        p { a href="/" { "Back to the keys" } }
    };
    layout(frame, "Error", body)
}

/// The page for a refused request (no frame: the caller is not known).
pub fn refused(reason: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" { head { meta charset="utf-8"; title { "keyward dashboard" } } body { h1 { "Refused" } p { (reason) } } }
    }
}
