//! Share of cart owners homed outside their own market, on a ring file, before and after home
//! regions: `cargo run --example placement_share -- [config/ring.toml] [owners]`.
//!
//! Each sampled owner is given a market round-robin over the regions that home shards (an even
//! spread of shoppers). "Global" places owners as tokens without a `region` claim are placed
//! (the ring over every shard); "regional" as tokens with the claim (their market's ring).

use cartedge::domain::ring::sample_owner_keys;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "config/ring.toml".into());
    let owners: usize = args
        .next()
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(100_000);
    let ring = cartedge::topology::load_ring(std::path::Path::new(&path))?;
    let mut markets: Vec<String> = ring
        .spec()
        .shards
        .iter()
        .map(|s| s.home.to_string())
        .collect();
    markets.sort();
    markets.dedup();
    let (mut global_away, mut regional_away) = (0usize, 0usize);
    let keys = sample_owner_keys(owners);
    for (n, key) in keys.iter().enumerate() {
        let market = &markets[n % markets.len()];
        if *ring.locate(key).home != *market {
            global_away += 1;
        }
        match ring.locate_in(key, market) {
            Some(placement) if *placement.home == *market => {}
            _ => regional_away += 1,
        }
    }
    let share = |away: usize| 100.0 * away as f64 / keys.len() as f64;
    println!(
        "ring {} ({} shards, {} regions), {} owners spread evenly over the regions",
        ring.fingerprint(),
        ring.spec().shards.len(),
        markets.len(),
        keys.len()
    );
    println!(
        "homed outside their region: global ring {:.1}% ({global_away}), regional rings {:.1}% ({regional_away})",
        share(global_away),
        share(regional_away)
    );
    Ok(())
}
