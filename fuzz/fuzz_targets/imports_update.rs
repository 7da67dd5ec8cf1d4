//! The controller's stream to the cluster DNS (dns/src/subscription.rs): `ImportsUpdate`s
//! applied to the imports, mapped to a catalog, and published as a zone and fast table.
#![no_main]

use hickory_proto::rr::{Name, RecordType};
use libfuzzer_sys::fuzz_target;
use trellis_core::imports::{Imports, ImportsUpdate};
use trellis_core::framing::{FrameDecoder, FrameError, encode_json_frame};
use trellis_dns::fast::FastTable;
use trellis_dns::subscription::catalog_from_imports;
use trellis_dns::zone::{Lookup, Zone, ZoneConfig};
use trellis_fuzz::{EDNS_UDP_SIZE, chunked};

const MAX_FRAME: usize = 1 << 16;

fn publish(imports: &Imports) {
    let catalog = catalog_from_imports(imports);
    assert_eq!(catalog.services.len(), imports.services.len());
    let zone = Zone::build(ZoneConfig::new("clusterset.local", 5).unwrap(), &catalog);
    // Every service is either published or listed as skipped, never lost silently.
    assert_eq!(
        zone.services() + zone.skipped().len(),
        catalog.services.len()
    );
    for service in &catalog.services {
        let key = format!("{}.{}", service.name, service.namespace);
        if zone.skipped().iter().any(|s| s.service == key) {
            continue;
        }
        let name = Name::from_ascii(format!(
            "{}.{}.svc.clusterset.local.",
            service.name, service.namespace
        ))
        .expect("a published service has a valid name");
        // A headless service without a ready endpoint has no name (the MCS DNS specification,
        // 2.4.1); any other published service exists.
        let exists = !service.headless
            || service
                .clusters
                .iter()
                .flat_map(|c| &c.endpoints)
                .any(|e| e.ready && !e.addresses.is_empty());
        let lookup = zone.lookup(&name, RecordType::A);
        if exists {
            assert!(
                matches!(lookup, Lookup::Found { .. } | Lookup::NoData),
                "published service {name} resolves: {lookup:?}"
            );
        } else {
            assert_eq!(lookup, Lookup::NxDomain, "{name} has no ready endpoint");
        }
    }
    let _ = FastTable::build(&zone, EDNS_UDP_SIZE);
}

fuzz_target!(|data: &[u8]| {
    let Some((step, stream)) = chunked(data) else {
        return;
    };
    let mut decoder = FrameDecoder::new(MAX_FRAME);
    let mut imports: Option<Imports> = None;
    for chunk in stream.chunks(step) {
        decoder.push(chunk);
        loop {
            let update = match decoder.next_json::<ImportsUpdate>() {
                Ok(Some(update)) => update,
                Ok(None) => break,
                Err(
                    FrameError::Malformed(_) | FrameError::TooLarge { .. },
                ) => {
                    return; // DNS drops the session and resubscribes
                }
                Err(other) => panic!("a decoder cannot fail with {other:?}"),
            };
            let frame = encode_json_frame(&update, "imports update", usize::MAX).unwrap();
            let mut again = FrameDecoder::new(usize::MAX);
            again.push(&frame);
            assert_eq!(
                again.next_json::<ImportsUpdate>().unwrap().as_ref(),
                Some(&update)
            );
            let state = imports.get_or_insert_with(Imports::default);
            let before = state.clone();
            let applied = state.apply(&update);
            match &update {
                ImportsUpdate::Snapshot(snapshot) => {
                    assert!(applied);
                    assert_eq!(state, snapshot);
                }
                ImportsUpdate::Delta {
                    from,
                    to,
                    upsert,
                    remove,
                } => {
                    assert_eq!(applied, *from == before.revision);
                    if !applied {
                        assert_eq!(*state, before, "a refused delta changes nothing");
                        return;
                    }
                    assert_eq!(state.revision, *to);
                    for key in remove {
                        let upserted = upsert.iter().any(|s| s.key() == *key);
                        assert_eq!(state.services.contains_key(&key.to_string()), upserted);
                    }
                    for service in upsert {
                        assert!(state.services.contains_key(&service.key().to_string()));
                    }
                }
            }
            publish(state);
        }
    }
});
