//! The API calls the pages make, each as the caller. Rotate and revoke are the
//! plugin's own calls, so the page and `kubectl keyward` behave alike.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::{
    authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
    core::v1::{Event, Namespace, Secret},
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, PostParams},
};
use zeroize::Zeroizing;

use super::form::NewKey;
use crate::{
    Error, Result,
    crd::{ApiKey, SECRET_DATA_KEY},
    key::wipe_secret,
    policy::ApiKeyPolicy,
};

/// The field manager of the ApiKeys the dashboard creates.
pub const FIELD_MANAGER: &str = "keyward-dashboard";
/// How long an action waits for the operator to confirm it.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

/// One ApiKey, read now.
pub async fn get_key(client: &Client, namespace: &str, name: &str) -> Result<ApiKey> {
    Ok(Api::<ApiKey>::namespaced(client.clone(), namespace)
        .get(name)
        .await?)
}

/// The key's Events, newest first; none when the caller may not read Events.
pub async fn events(client: &Client, key: &ApiKey) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), &key.namespace().unwrap_or_default());
    let selector = format!(
        "involvedObject.kind=ApiKey,involvedObject.name={}",
        key.name_any()
    );
    let mut events = api
        .list(&ListParams::default().fields(&selector))
        .await
        .map(|list| list.items)
        .unwrap_or_default();
    // An earlier ApiKey of the same name had other Events.
    let uid = key.metadata.uid.clone();
    events.retain(|e| {
        uid.is_none() || e.involved_object.uid.is_none() || e.involved_object.uid == uid
    });
    events.sort_by_key(|e| std::cmp::Reverse(super::view::event_time(e)));
    events
}

/// Whether the API server allows the caller this request (a SelfSubjectAccessReview).
async fn may(client: &Client, attributes: ResourceAttributes) -> Result<bool> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(attributes),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// Whether the caller may list ApiKeys in every namespace.
pub async fn may_list_everywhere(client: &Client) -> Result<bool> {
    may(
        client,
        ResourceAttributes {
            group: Some("keyward.dev".into()),
            resource: Some("apikeys".into()),
            verb: Some("list".into()),
            ..Default::default()
        },
    )
    .await
}

/// Whether the caller may read the key's Secret: only then is "Reveal" offered.
pub async fn may_read_secret(client: &Client, key: &ApiKey) -> bool {
    let secret = key
        .status
        .as_ref()
        .and_then(|s| s.secret_name.clone())
        .or_else(|| key.target_secret_name().map(str::to_owned));
    may(
        client,
        ResourceAttributes {
            namespace: key.namespace(),
            resource: Some("secrets".into()),
            verb: Some("get".into()),
            name: secret,
            ..Default::default()
        },
    )
    .await
    .unwrap_or(false)
}

/// The key from the ApiKey's Secret: (Secret name, key). The caller's own read.
pub async fn read_key(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(String, Zeroizing<String>)> {
    let key = get_key(client, namespace, name).await?;
    let secret_name = key
        .status
        .as_ref()
        .and_then(|s| s.secret_name.clone())
        .or_else(|| key.target_secret_name().map(str::to_owned))
        .ok_or(Error::MissingMetadata("name"))?;
    let mut secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(&secret_name)
        .await?;
    let key = secret
        .data
        .as_ref()
        .and_then(|data| data.get(SECRET_DATA_KEY))
        .map(|bytes| std::str::from_utf8(&bytes.0).map(|text| Zeroizing::new(text.to_owned())));
    wipe_secret(&mut secret);
    match key {
        Some(Ok(key)) => Ok((secret_name, key)),
        Some(Err(_)) => Err(Error::Config(format!(
            "Secret {namespace}/{secret_name} holds no text key"
        ))),
        None => Err(Error::Config(format!(
            "Secret {namespace}/{secret_name} holds no key yet"
        ))),
    }
}

/// Creates the ApiKey (or only validates it, with `dry_run`), as the caller.
pub async fn create(client: &Client, form: &NewKey, dry_run: bool) -> Result<()> {
    let params = PostParams {
        dry_run,
        field_manager: Some(FIELD_MANAGER.into()),
    };
    Api::<ApiKey>::namespaced(client.clone(), &form.namespace)
        .create(&params, &form.to_apikey())
        .await?;
    Ok(())
}

/// Rotates now, as `kubectl keyward rotate [--immediate]` does, and waits for the operator.
pub async fn rotate(client: &Client, namespace: &str, name: &str, emergency: bool) -> Result<()> {
    let api = Api::<ApiKey>::namespaced(client.clone(), namespace);
    let request = format!(
        "keyward-dashboard-{}",
        jiff::Timestamp::now().as_millisecond()
    );
    crate::plugin::rotate(&api, name, &request, emergency, CONFIRM_TIMEOUT).await?;
    Ok(())
}

/// Deletes the ApiKey as `kubectl keyward revoke` does and waits until it is
/// gone: `Ok(Err(why))` when it is still terminating at the deadline.
pub async fn revoke(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<std::result::Result<(), String>> {
    let api = Api::<ApiKey>::namespaced(client.clone(), namespace);
    match crate::plugin::revoke(&api, name, CONFIRM_TIMEOUT, |_| {}).await {
        Ok(()) => Ok(Ok(())),
        Err(Error::Config(why)) => Ok(Err(why)),
        Err(other) => Err(other),
    }
}

/// Every ApiKeyPolicy the caller may read.
pub async fn policies(client: &Client) -> Result<Vec<ApiKeyPolicy>> {
    Ok(Api::<ApiKeyPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items)
}

/// A namespace's labels; `None` when the caller may not read it.
pub async fn namespace_labels(client: &Client, name: &str) -> Option<BTreeMap<String, String>> {
    Api::<Namespace>::all(client.clone())
        .get_metadata(name)
        .await
        .ok()
        .map(|ns| ns.labels().clone())
}
