//! Sites: creation, reading, listing and settings.

use super::Domain;
use crate::error::{Error, Result};
use crate::model::{
    DEFAULT_FAILED_ATTEMPT_LIMIT, FAILED_ATTEMPT_LIMIT_RANGE, Site, now_millis, short_id,
};
use crate::store::{Page, PageRequest, SiteFilter};

/// Changes to a site's settings; `None` leaves a setting as it is.
#[derive(Debug, Default, Clone)]
pub struct SiteChanges {
    pub display_name: Option<String>,
    pub failed_attempt_limit: Option<u32>,
    pub reset_passcode_visible_days: Option<u32>,
}

pub fn validate_display_name(name: &str) -> Result<String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(Error::InvalidArgument(
            "display_name must be 1 to 200 characters".into(),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(
            "display_name must not contain control characters".into(),
        ));
    }
    Ok(name.to_owned())
}

pub fn validate_failed_attempt_limit(limit: u32) -> Result<u32> {
    if FAILED_ATTEMPT_LIMIT_RANGE.contains(&limit) {
        Ok(limit)
    } else {
        Err(Error::InvalidArgument(format!(
            "failed_attempt_limit must be between {} and {}, got {limit}",
            FAILED_ATTEMPT_LIMIT_RANGE.start(),
            FAILED_ATTEMPT_LIMIT_RANGE.end()
        )))
    }
}

impl Domain {
    /// Creates a site; `failed_attempt_limit` None means the default.
    pub async fn create_site(
        &self,
        display_name: &str,
        failed_attempt_limit: Option<u32>,
    ) -> Result<Site> {
        let display_name = validate_display_name(display_name)?;
        let failed_attempt_limit = match failed_attempt_limit {
            Some(limit) => validate_failed_attempt_limit(limit)?,
            None => DEFAULT_FAILED_ATTEMPT_LIMIT,
        };
        loop {
            let site = Site {
                site_id: short_id("st"),
                display_name: display_name.clone(),
                failed_attempt_limit,
                created_at: now_millis(),
                reset_passcode_visible_days: 0,
                passcode_policy: Default::default(),
                webhook: None,
            };
            if self.store.insert_site(&site).await? {
                tracing::info!(site_id = %site.site_id, "site created");
                return Ok(site);
            }
        }
    }

    pub async fn get_site(&self, site_id: &str) -> Result<Site> {
        self.site(site_id).await
    }

    pub async fn list_sites(
        &self,
        filter: &SiteFilter,
        page: PageRequest<'_>,
    ) -> Result<Page<Site>> {
        Ok(self.store.list_sites(filter, page).await?)
    }

    pub async fn update_site(&self, site_id: &str, changes: SiteChanges) -> Result<Site> {
        self.site(site_id).await?;
        // Every change is checked before the site is written.
        let display_name = changes
            .display_name
            .map(|name| validate_display_name(&name))
            .transpose()?;
        let limit = changes
            .failed_attempt_limit
            .map(validate_failed_attempt_limit)
            .transpose()?;
        if changes
            .reset_passcode_visible_days
            .is_some_and(|days| days > 3650)
        {
            return Err(Error::InvalidArgument(
                "reset_passcode_visible_days must be at most 3650".into(),
            ));
        }
        self.change_site(
            site_id,
            Box::new(move |site| {
                if let Some(name) = display_name {
                    site.display_name = name;
                }
                if let Some(limit) = limit {
                    site.failed_attempt_limit = limit;
                }
                if let Some(days) = changes.reset_passcode_visible_days {
                    site.reset_passcode_visible_days = days;
                }
                true
            }),
        )
        .await
    }
}
