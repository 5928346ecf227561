//! Sites, and which of them have a webhook.

use super::*;

impl Storage {
    /// Stores a new site; false when the id is taken.
    pub fn insert_site(&self, site: &Site) -> Result<bool, StorageError> {
        let _guard = hold(&self.sites_lock);
        let swapped = self.sites.compare_and_swap(
            site.site_id.as_bytes(),
            None as Option<&[u8]>,
            Some(encode(site)),
        )?;
        if swapped.is_ok() && site.webhook.is_some() {
            self.webhook_sites
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(site.site_id.clone());
        }
        Ok(swapped.is_ok())
    }

    pub fn get_site(&self, site_id: &str) -> Result<Option<Site>, StorageError> {
        self.sites
            .get(site_id.as_bytes())?
            .map(|v| decode(&v))
            .transpose()
    }

    pub fn put_site(&self, site: &Site) -> Result<(), StorageError> {
        self.sites.insert(site.site_id.as_bytes(), encode(site))?;
        let mut webhooks = self
            .webhook_sites
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if site.webhook.is_some() {
            webhooks.insert(site.site_id.clone());
        } else {
            webhooks.remove(&site.site_id);
        }
        Ok(())
    }

    /// Changes a site under the sites lock, so that concurrent changes of
    /// different settings (name, policy, webhook) do not undo each other.
    /// Returns the site after, or None when there is none.
    pub fn update_site(
        &self,
        site_id: &str,
        change: impl FnOnce(&mut Site) -> bool,
    ) -> Result<Option<Site>, StorageError> {
        let _guard = hold(&self.sites_lock);
        let Some(mut site) = self.get_site(site_id)? else {
            return Ok(None);
        };
        if change(&mut site) {
            self.put_site(&site)?;
        }
        Ok(Some(site))
    }

    /// Sites ordered by id, keeping those `visible` lets through.
    pub fn list_sites(
        &self,
        page_token: &str,
        limit: usize,
        visible: impl Fn(&Site) -> bool,
    ) -> Result<Page<Site>, StorageError> {
        page(
            &self.sites,
            b"sites\0",
            b"",
            page_token,
            limit,
            false,
            |_, v| {
                let site: Site = decode(v)?;
                Ok(visible(&site).then_some(site))
            },
        )
    }
}
