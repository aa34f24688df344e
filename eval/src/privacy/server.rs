//! One setting's attacks, server by server: every family's reconstruction and prompt guess
//! of every test picture, scored against the truth and tallied.

use std::collections::BTreeMap;
use std::ops::Range;

use veil_core::placement::{Policy, ViewKind};

use crate::attacker::Result;
use crate::dataset::Scene;
use crate::metrics::Picture;

use super::calls::{decode, observe_all, Item, SeenRows, ServerSight, Setting};
use super::cross::FIRST_BLOCK;
use super::features::{held_rows, rows_features, slot_scene, view_parts, ViewParts};
use super::metrics::{
    attributes_right, known_pixel_rows, objects_outside, outside_object_error, pooled_psnr,
    slots_right,
};
use super::report::{best, ImageRow, ObjectsRow, PromptRow, SettingRow};
use super::ridge::Linear;
use super::{split_targets, Shared};

/// Running totals of one family.
#[derive(Default)]
struct Tally {
    se: f64,
    px: usize,
    attr_right: usize,
    attrs: usize,
    slots_right: usize,
    slots: usize,
    exact: usize,
    guesses: usize,
}

impl Tally {
    fn picture(&mut self, item: &Item, guess: &Picture, known: &Range<usize>, side: usize) {
        let (se, n) = outside_object_error(item, guess, known);
        self.se += se;
        self.px += n;
        let objects = objects_outside(&item.scene, side, known);
        let (r, t) = attributes_right(guess, &objects);
        self.attr_right += r;
        self.attrs += t;
    }

    fn prompt(&mut self, truth: &Item, guess: Option<&Scene>, exact: bool) {
        self.slots_right += slots_right(&truth.scene, guess);
        self.slots += 5;
        self.exact += usize::from(exact);
        self.guesses += 1;
    }

    fn psnr(&self) -> Option<f64> {
        pooled_psnr(self.se, self.px)
    }
    fn attr(&self) -> Option<f64> {
        (self.attrs > 0).then(|| self.attr_right as f64 / self.attrs as f64)
    }
    fn words(&self) -> Option<f64> {
        (self.slots > 0).then(|| self.slots_right as f64 / self.slots as f64)
    }
}

/// One learned attack's predictions of the test pictures: (parts read, latents, slot scores).
type ViewPredictions = (ViewParts, Vec<Vec<f32>>, Vec<Vec<f32>>);

/// Keeps what the attacks of the test pictures read (the rest of a sight is large).
fn keep_for_test(mut s: ServerSight) -> ServerSight {
    s.seen.retain(|v| match v.view.kind {
        ViewKind::Latent | ViewKind::Moments | ViewKind::Strip => true,
        ViewKind::KeyValue => v.view.layer.contains(FIRST_BLOCK),
        ViewKind::TextKeyValue => v.view.layer.contains(super::ppidm::TEXT_LAYER),
        ViewKind::Block => v.view.layer == "conv_in",
        _ => false,
    });
    s
}

/// Fits `strict`'s whole-view decoder and prompt probe (one map) per server on the training
/// calls, for each choice of view parts (`ViewParts::ALL`).
fn fit_view_models(
    shared: &Shared<'_>,
    setting: &Setting,
    batch: usize,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Vec<Vec<(ViewParts, Linear)>>> {
    let n = setting.servers;
    let train = &shared.train;
    let parts = ViewParts::ALL;
    let mut feats: Vec<Vec<Vec<Vec<f32>>>> =
        vec![vec![Vec::with_capacity(train.len()); parts.len()]; n];
    let label = format!("{}: attacker's training calls", setting.label());
    observe_all(shared.sd, setting, train, batch, &mut |i, sights| {
        for (k, sight) in sights.iter().enumerate() {
            for (j, p) in parts.iter().enumerate() {
                feats[k][j].push(view_parts(&train[i], sight, *p));
            }
        }
        if (i + 1) % batch == 0 || i + 1 == train.len() {
            progress(&label, i + 1, train.len());
        }
        Ok(())
    })?;
    let y: Vec<Vec<f32>> = train.iter().map(super::targets).collect();
    feats
        .iter()
        .map(|per| {
            per.iter()
                .zip(parts)
                .map(|(f, p)| Ok((p, Linear::fit(f, &y)?)))
                .collect()
        })
        .collect()
}

/// Every server's row of one setting.
pub fn attack_setting(
    shared: &mut Shared<'_>,
    setting: &Setting,
    batch: usize,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Vec<SettingRow>> {
    let mut sights: Vec<Vec<ServerSight>> = Vec::with_capacity(shared.test.len());
    observe_all(shared.sd, setting, &shared.test, batch, &mut |_, s| {
        sights.push(s.into_iter().map(keep_for_test).collect());
        Ok(())
    })?;
    // The halves-together layout is measured for the CFG-difference test only.
    let learned = setting.policy == Policy::Strict && setting.apart();
    let view_models = match learned && !shared.train.is_empty() {
        true => Some(fit_view_models(shared, setting, batch, progress)?),
        false => None,
    };
    (0..setting.servers)
        .map(|s| {
            let models = view_models.as_ref().and_then(|m| m.get(s));
            attack_server(shared, setting, s, &sights, models)
        })
        .collect()
}

/// The test pictures' (item, sight) for server `s`.
fn column<'a>(
    shared: &'a Shared<'_>,
    sights: &'a [Vec<ServerSight>],
    s: usize,
) -> Vec<(&'a Item, &'a ServerSight)> {
    shared
        .test
        .iter()
        .zip(sights)
        .filter_map(|(i, per)| per.get(s).map(|x| (i, x)))
        .collect()
}

fn attack_server(
    shared: &mut Shared<'_>,
    setting: &Setting,
    s: usize,
    sights: &[Vec<ServerSight>],
    view_models: Option<&Vec<(ViewParts, Linear)>>,
) -> Result<SettingRow> {
    let (lc, lh, lw) = shared.test.first().map_or((4, 16, 16), |i| i.latent);
    let per_row = shared
        .test
        .first()
        .map_or(1, |i| i.truth.height / lh.max(1));
    let strip = sights
        .first()
        .and_then(|p| p.get(s))
        .map_or(0..lh, |x| x.strip.clone());
    let held = held_rows(&strip, lh);
    // With one server nothing is outside: the gate scores every object pixel.
    let known = match setting.servers {
        1 => 0..0,
        _ => known_pixel_rows(&strip, lh, per_row),
    };
    let side = shared.test.first().map_or(64, |i| i.truth.width);
    let ctrl_in: Vec<Vec<f32>> = shared
        .test
        .iter()
        .map(|i| rows_features(i, &held))
        .collect();
    let (ctrl_x0, ctrl_slots): (Vec<_>, Vec<_>) = shared
        .control(&held)?
        .predict(&ctrl_in)?
        .iter()
        .map(|p| split_targets(p, lc * lh * lw))
        .unzip();
    let mut image: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut prompt: BTreeMap<&str, Tally> = BTreeMap::new();
    let col = column(shared, sights, s);
    let mut views: Vec<ViewPredictions> = Vec::new();
    for (parts, m) in view_models.into_iter().flatten() {
        let f: Vec<Vec<f32>> = col.iter().map(|(i, x)| view_parts(i, x, *parts)).collect();
        let (x0, slots) = m
            .predict(&f)?
            .iter()
            .map(|p| split_targets(p, lc * lh * lw))
            .unzip();
        views.push((*parts, x0, slots));
    }
    for (k, (item, sight)) in col.iter().enumerate() {
        let pic = decode(shared.sd, &ctrl_x0[k])?;
        image
            .entry("control")
            .or_default()
            .picture(item, &pic, &known, side);
        let guess = slot_scene(&ctrl_slots[k]);
        prompt
            .entry("control")
            .or_default()
            .prompt(item, guess.as_ref(), false);
        let bg = background_fill(shared, item, &held, &known)?;
        image
            .entry("background fill")
            .or_default()
            .picture(item, &bg, &known, side);
        image
            .entry("mean picture")
            .or_default()
            .picture(item, &shared.mean_picture, &known, side);
        for (parts, x0, slots) in &views {
            let (decoder, probe) = parts.families();
            let pic = decode(shared.sd, &x0[k])?;
            image
                .entry(decoder)
                .or_default()
                .picture(item, &pic, &known, side);
            let guess = slot_scene(&slots[k]);
            prompt
                .entry(probe)
                .or_default()
                .prompt(item, guess.as_ref(), false);
        }
        if setting.policy == Policy::Strict {
            if let Some(pic) = moments_closed_form(shared, item, sight, &held)? {
                image
                    .entry("moments")
                    .or_default()
                    .picture(item, &pic, &known, side);
            }
            if let Some(c) = cfg_difference(shared, sight)? {
                let guess = Scene::parse(&c);
                prompt.entry("cfg difference").or_default().prompt(
                    item,
                    guess.as_ref(),
                    c == item.caption,
                );
            }
        }
        if matches!(setting.policy, Policy::Ppidm { .. }) {
            let r = super::ppidm::attack(shared, item, sight)?;
            if let Some(pic) = r.picture {
                image
                    .entry("inverted and finished")
                    .or_default()
                    .picture(item, &pic, &known, side);
            }
            if let Some(c) = r.caption {
                let guess = Scene::parse(&c);
                prompt.entry("text inversion").or_default().prompt(
                    item,
                    guess.as_ref(),
                    c.trim() == item.caption,
                );
            }
        }
    }
    Ok(row(setting, s, &strip, &image, &prompt))
}

const BASELINES: [&str; 3] = ["control", "background fill", "mean picture"];

fn row(
    setting: &Setting,
    s: usize,
    strip: &Range<usize>,
    image: &BTreeMap<&str, Tally>,
    prompt: &BTreeMap<&str, Tally>,
) -> SettingRow {
    let fam = |m: &BTreeMap<&str, Tally>, f: &dyn Fn(&Tally) -> Option<f64>| {
        m.iter()
            .filter(|(k, _)| !BASELINES.contains(k))
            .map(|(k, t)| (k.to_string(), f(t)))
            .collect::<BTreeMap<String, Option<f64>>>()
    };
    let get = |m: &BTreeMap<&str, Tally>, k: &str, f: &dyn Fn(&Tally) -> Option<f64>| {
        m.get(k).and_then(f)
    };
    let img_f = fam(image, &Tally::psnr);
    let obj_f = fam(image, &Tally::attr);
    let pr_f = fam(prompt, &Tally::words);
    let exact = prompt
        .iter()
        .filter(|(k, _)| !BASELINES.contains(k))
        .filter(|(_, t)| t.guesses > 0)
        .map(|(_, t)| t.exact as f64 / t.guesses as f64)
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    let (u, c) = setting.halves_of(s);
    SettingRow {
        policy: setting.policy.name().to_string(),
        servers: setting.servers,
        server: s,
        guidance_halves: setting.halves.name().to_string(),
        holds: match (u, c) {
            (true, true) => "both halves",
            (true, false) => "unconditional half",
            _ => "conditional half",
        }
        .to_string(),
        strip: [strip.start, strip.end],
        image: ImageRow {
            attack_psnr_outside: best(&img_f),
            control_psnr_outside: get(image, "control", &Tally::psnr),
            background_fill_psnr_outside: get(image, "background fill", &Tally::psnr),
            mean_picture_psnr_outside: get(image, "mean picture", &Tally::psnr),
            families: img_f,
        },
        objects_outside: ObjectsRow {
            objects: image.get("control").map_or(0, |t| t.attrs / 4),
            attack_accuracy: best(&obj_f),
            control_accuracy: get(image, "control", &Tally::attr),
            families: obj_f,
        },
        prompt: PromptRow {
            attack_word_accuracy: best(&pr_f),
            control_word_accuracy: get(prompt, "control", &Tally::words),
            attack_exact: exact,
            families: pr_f,
        },
    }
}

/// The own strip decoded (its x_t rows in the mean latent), and its most common colour —
/// the background, almost always — everywhere outside the known rows.
fn background_fill(
    shared: &Shared<'_>,
    item: &Item,
    held: &Range<usize>,
    known: &Range<usize>,
) -> Result<Picture> {
    let (c, h, w) = item.latent;
    let mut lat = mean_latent(shared);
    for ch in 0..c {
        for r in held.clone() {
            let s = (ch * h + r) * w;
            lat[s..s + w].copy_from_slice(&item.xt[s..s + w]);
        }
    }
    let mut pic = decode(shared.sd, &lat)?;
    let (ph, pw) = (pic.height, pic.width);
    let plane = ph * pw;
    let per_row = ph / h.max(1);
    let own: Range<usize> = held.start * per_row..held.end * per_row;
    let mut bg = [0f32; 3];
    for (k, b) in bg.iter_mut().enumerate() {
        let mut v: Vec<f32> = own
            .clone()
            .flat_map(|y| (0..pw).map(move |x| y * pw + x))
            .filter_map(|p| pic.data.get(k * plane + p).copied())
            .collect();
        v.sort_by(f32::total_cmp);
        *b = v.get(v.len() / 2).copied().unwrap_or(0.5);
    }
    for y in (0..ph).filter(|y| !known.contains(y) && !own.contains(y)) {
        for x in 0..pw {
            for (k, b) in bg.iter().enumerate() {
                if let Some(d) = pic.data.get_mut(k * plane + y * pw + x) {
                    *d = *b;
                }
            }
        }
    }
    Ok(pic)
}

fn mean_latent(shared: &Shared<'_>) -> Vec<f32> {
    let n = shared.train.len().max(1) as f32;
    let mut m = vec![0f32; shared.train.first().map_or(0, |i| i.x0.len())];
    for it in &shared.train {
        m.iter_mut().zip(&it.x0).for_each(|(a, b)| *a += b / n);
    }
    m
}

/// The mean picture's PSNR over all object pixels of the test pictures.
pub fn mean_picture_psnr(shared: &Shared<'_>) -> Option<f64> {
    let mut t = Tally::default();
    let side = shared.test.first().map_or(64, |i| i.truth.width);
    for it in &shared.test {
        t.picture(it, &shared.mean_picture, &(0..0), side);
    }
    t.psnr()
}

/// The closed form from the first GroupNorm's moments: conv_in is linear, so the per-channel
/// means of its output over the whole map give the latent's per-channel means (least squares,
/// borders ignored); the rows outside the held ones get the mean the held rows leave over.
fn moments_closed_form(
    shared: &Shared<'_>,
    item: &Item,
    sight: &ServerSight,
    held: &Range<usize>,
) -> Result<Option<Picture>> {
    let Some(m) = sight.find(ViewKind::Moments, "down_blocks.0.resnets.0.norm1") else {
        return Ok(None);
    };
    let Some(stats) = m.cond.as_ref().or(m.uncond.as_ref()) else {
        return Ok(None);
    };
    let Some(mu_x) = super::ppidm::latent_means_from_conv_in(shared.sd, stats)? else {
        return Ok(None);
    };
    let (c, h, w) = item.latent;
    let a = item_alpha(shared, item)?;
    let mut lat = vec![0f32; c * h * w];
    let outside = (h - held.len()) * w;
    for (ch, mu) in mu_x.iter().enumerate().take(c) {
        let own: f32 = held
            .clone()
            .flat_map(|r| (0..w).map(move |x| (ch * h + r) * w + x))
            .map(|i| item.xt[i])
            .sum();
        let rest = match outside {
            0 => 0.0,
            n => (mu * (h * w) as f32 - own) / n as f32,
        };
        for r in 0..h {
            for x in 0..w {
                let i = (ch * h + r) * w + x;
                let v = if held.contains(&r) { item.xt[i] } else { rest };
                lat[i] = v / a;
            }
        }
    }
    Ok(Some(decode(shared.sd, &lat)?))
}

/// sqrt(ᾱ_t) of an item's timestep.
pub fn item_alpha(shared: &Shared<'_>, item: &Item) -> Result<f32> {
    let a = shared.sd.scheduler_config.alphas_cumprod()?;
    Ok(a.get(item.t).map_or(1.0, |v| v.sqrt() as f32))
}

/// The CFG-difference test on the first transformer block's scattered stream: exact with
/// both halves, estimated from the server's own tokens with the conditional half alone.
fn cfg_difference(shared: &Shared<'_>, sight: &ServerSight) -> Result<Option<String>> {
    let Some(stream) = sight
        .all(ViewKind::Strip)
        .find(|v| v.view.layer == format!("{FIRST_BLOCK}.norm3"))
    else {
        return Ok(None);
    };
    let SeenRows {
        dims, uncond, cond, ..
    } = stream;
    let (Some(tc), Some(&channels)) = (cond.as_ref(), dims.last()) else {
        return Ok(None);
    };
    let attack = &shared.cfg_attack;
    let y = match (uncond, before_tokens(sight)) {
        (Some(tu), _) => attack.solve_shared(tu, channels)?.0,
        (None, Some(b)) => attack.estimate_shared(&b, channels)?,
        (None, None) => return Ok(None),
    };
    let (best, _) = attack.best_caption(&y, tc)?;
    Ok(attack.captions().get(best).cloned())
}

/// The server's own tokens entering the first transformer block: what it computed and
/// returned for the phone's first gather of a call (strict gathers only for the attention
/// sub-layers and the output, and the first block comes first).
fn before_tokens(sight: &ServerSight) -> Option<Vec<f32>> {
    sight
        .returned
        .iter()
        .find(|r| r.kind == veil_core::placement::OpKind::Gather)
        .and_then(|r| r.cond.clone())
}
