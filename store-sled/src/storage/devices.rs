//! Devices: enrollment, the serial-number index and the device cache.

use super::*;

impl Storage {
    /// Stores a newly enrolled device. `proven` is the device the enrolling
    /// client proved to be (by its current certificate): an active device of
    /// the same site with the same serial number is marked replaced by the
    /// new one. A serial number alone proves nothing, so an active device
    /// claiming it stays enrolled; the one of them enrolled last is named.
    /// A device id that is taken is refused, storing nothing.
    pub fn enroll_device(
        &self,
        device: &mut Device,
        proven: Option<&str>,
    ) -> Result<Enrolled, StorageError> {
        let _guard = hold(&self.devices_lock);
        if self.get_device(&device.device_id)?.is_some() {
            return Err(StorageError::Refused(format!(
                "device id {} is taken",
                device.device_id
            )));
        }
        let serial = device.facts.serial_number.clone();
        // Index entries first: the device record is the commit point.
        let write_indexes = |device: &Device| -> Result<(), StorageError> {
            self.site_devices
                .insert(key2(&device.site_id, &device.device_id), &[])?;
            if !serial.is_empty() {
                self.serial_devices
                    .insert(key3(&device.site_id, &serial, &device.device_id), &[])?;
            }
            Ok(())
        };
        if let Some(old_id) = proven {
            let _old_guard = hold_stripe(&self.device_locks, old_id);
            if let Some(mut old) = self.load_device(old_id)?.map(Arc::unwrap_or_clone)
                && old.status == DeviceStatus::Active
                && old.site_id == device.site_id
                && old.facts.serial_number == serial
            {
                old.status = DeviceStatus::Replaced;
                old.replaced_by_device_id = Some(device.device_id.clone());
                device.replaces_device_id = Some(old_id.to_owned());
                write_indexes(device)?;
                self.put_device(device)?;
                // The old record changes only once the new one exists.
                self.put_device(&old)?;
                return Ok(Enrolled::Replacing(old_id.to_owned()));
            }
        }
        let duplicate_of = if serial.is_empty() {
            None
        } else {
            self.active_device_with_serial(&device.site_id, &serial)?
        };
        write_indexes(device)?;
        self.put_device(device)?;
        Ok(match duplicate_of {
            Some(other) => Enrolled::AlongsideSameSerial(other),
            None => Enrolled::New,
        })
    }

    /// The active device of the site with this serial number that enrolled
    /// last (by `enrolled_at`, then id), if any. Callers hold the devices lock.
    pub(super) fn active_device_with_serial(
        &self,
        site_id: &str,
        serial: &str,
    ) -> Result<Option<String>, StorageError> {
        let prefix = key3(site_id, serial, "");
        let mut last: Option<(Millis, String)> = None;
        for key in self.serial_devices.scan_prefix(&prefix).keys() {
            let key = key?;
            let device_id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            let device = {
                let _stripe = hold_stripe(&self.device_locks, &device_id);
                self.load_device(&device_id)?
            };
            // A serial with a NUL can share a prefix with another: the
            // record decides.
            if let Some(device) = device
                && device.status == DeviceStatus::Active
                && device.site_id == site_id
                && device.facts.serial_number == serial
            {
                let candidate = (device.enrolled_at, device_id);
                if last.as_ref().is_none_or(|last| candidate > *last) {
                    last = Some(candidate);
                }
            }
        }
        Ok(last.map(|(_, device_id)| device_id))
    }

    /// Schema 4 lists every device enrolled with a serial number: built
    /// once from the device records (idempotent, so a crash during the
    /// upgrade only repeats it).
    pub(super) fn index_device_serials(&self) -> Result<(), StorageError> {
        let mut indexed = 0usize;
        for entry in self.devices.iter() {
            let (_, value) = entry?;
            let device: Device = decode(&value)?;
            if !device.facts.serial_number.is_empty() {
                self.serial_devices.insert(
                    key3(
                        &device.site_id,
                        &device.facts.serial_number,
                        &device.device_id,
                    ),
                    &[],
                )?;
                indexed += 1;
            }
        }
        if indexed > 0 {
            tracing::info!(indexed, "device serial numbers indexed");
        }
        Ok(())
    }

    /// Stores a security alert and the notifications it sends.
    pub fn put_alert(
        &self,
        alert: &Alert,
        notifications: &[Notification],
    ) -> Result<(), StorageError> {
        self.alerts
            .insert(key2(&alert.site_id, &alert.alert_id), encode(alert))?;
        for notification in notifications {
            self.put_notification(notification)?;
        }
        Ok(())
    }

    /// A device as stored, shared with the cache (callers only read it).
    pub fn get_device(&self, device_id: &str) -> Result<Option<Arc<Device>>, StorageError> {
        if let Some(device) = self.cached_device(device_id) {
            return Ok(Some(device));
        }
        let _guard = hold_stripe(&self.device_locks, device_id);
        self.load_device(device_id)
    }

    pub(super) fn cached_device(&self, device_id: &str) -> Option<Arc<Device>> {
        self.device_cache
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(device_id)
            .cloned()
    }

    /// Reads a device for a caller holding its stripe lock: no write can
    /// land between the read from sled and filling the cache.
    pub(super) fn load_device(&self, device_id: &str) -> Result<Option<Arc<Device>>, StorageError> {
        if let Some(device) = self.cached_device(device_id) {
            return Ok(Some(device));
        }
        let Some(value) = self.devices.get(device_id.as_bytes())? else {
            return Ok(None);
        };
        let device = Arc::new(decode::<Device>(&value)?);
        self.cache_device(device.clone());
        Ok(Some(device))
    }

    /// Writes a device record and its cached copy. Callers hold its stripe
    /// lock, or made the device and have not returned its id yet.
    pub(super) fn put_device(&self, device: &Device) -> Result<(), StorageError> {
        self.devices
            .insert(device.device_id.as_bytes(), encode(device))?;
        self.cache_device(Arc::new(device.clone()));
        Ok(())
    }

    pub(super) fn cache_device(&self, device: Arc<Device>) {
        self.device_cache
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(device.device_id.clone(), device);
    }

    /// Changes a device under the devices lock; `change` returns false to
    /// leave it as it was. Returns the device after.
    pub fn update_device(
        &self,
        device_id: &str,
        change: impl FnOnce(&mut Device) -> bool,
    ) -> Result<Option<Device>, StorageError> {
        let _guard = hold_stripe(&self.device_locks, device_id);
        let Some(mut device) = self.load_device(device_id)?.map(Arc::unwrap_or_clone) else {
            return Ok(None);
        };
        if change(&mut device) {
            self.put_device(&device)?;
        }
        Ok(Some(device))
    }

    /// A site's devices ordered by id, keeping those `keep` lets through.
    pub fn list_devices(
        &self,
        site_id: &str,
        page_token: &str,
        limit: usize,
        keep: impl Fn(&Device) -> bool,
    ) -> Result<Page<Device>, StorageError> {
        let prefix = prefix(site_id);
        page(
            &self.site_devices,
            b"devices\0",
            &prefix,
            page_token,
            limit,
            false,
            |key, _| {
                let device_id = String::from_utf8_lossy(&key[prefix.len()..]);
                Ok(self
                    .get_device(&device_id)?
                    .filter(|d| keep(d))
                    .map(Arc::unwrap_or_clone))
            },
        )
    }
}
