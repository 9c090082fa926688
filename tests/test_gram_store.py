"""The compact task Grams of a Pareto set against numpy and the refit."""

import dataclasses

import jax
import numpy as np
import pytest

from mosp_jax.config import DEFAULT, PAPER
from mosp_jax.pipeline import artifact, gram_store
from mosp_jax.solvers import Unstructured, mosp_materialize, mosp_pareto

from .conftest import rel_err, task_grams


@pytest.fixture(scope="module")
def grams():
  g = task_grams(np.random.default_rng(3), 3, 40)
  g[1, 7, :] = g[1, :, 7] = 0.0  # An input that is always zero.
  return g


def test_round_trip_within_half_a_float16_ulp_of_the_correlation(grams):
  dec = np.asarray(gram_store.decode(gram_store.encode(grams)))
  assert dec.dtype == np.float32 and dec.shape == grams.shape
  np.testing.assert_array_equal(dec, np.swapaxes(dec, 1, 2))
  for g, d in zip(grams, dec, strict=True):
    np.testing.assert_array_equal(np.diag(d), np.diag(g))  # Exact.
    s = np.sqrt(np.diag(g).astype(np.float64))
    corr = g / np.outer(s, s).clip(1e-300)
    # float16 rounds |c| <= 1 to 2^-11 of itself (2^-25 absolute near 0).
    bound = (np.abs(corr) * 2.0 ** -11 + 2.0 ** -25) * np.outer(s, s)
    assert (np.abs(d - g) <= bound * 1.001 + 1e-7 * np.abs(g)).all()
  np.testing.assert_array_equal(dec[1, 7], 0.0)
  np.testing.assert_array_equal(dec[1, :, 7], 0.0)


def test_storing_again_changes_nothing(grams):
  s = gram_store.encode(grams)
  again = gram_store.encode(gram_store.decode(s))
  np.testing.assert_array_equal(np.asarray(again.diag), np.asarray(s.diag))
  np.testing.assert_array_equal(np.asarray(again.corr), np.asarray(s.corr))


def test_bytes_are_a_quarter_of_float32_and_saved_as_counted(grams,
                                                             tmp_path):
  m, n, _ = grams.shape
  s = gram_store.encode(grams)
  assert np.asarray(s.corr).dtype == np.float16
  assert (np.asarray(s.diag).nbytes + np.asarray(s.corr).nbytes
          == gram_store.nbytes(n, m))
  # A quarter of the float32 Grams plus the diagonal: (1/4 + 3/(4n)).
  assert gram_store.nbytes(n, m) == grams.nbytes * (1 / 4 + 3 / (4 * n))
  # Saved and loaded back bit for bit; a float32 Gram of an older set
  # (key 'gram/<group>') is still read as it is.
  W = np.zeros((n, 4), np.float32)
  par = mosp_pareto(grams, W + 1.0, pattern=Unstructured(0.5), cfg=PAPER)[0]
  artifact.save_layer(tmp_path, 0, {"q": jax.device_get(par)},
                      grams={"q": jax.device_get(s)})
  back = artifact.load_grams(tmp_path, 0)["q"]
  assert isinstance(back, gram_store.StoredGrams)
  np.testing.assert_array_equal(back.corr, np.asarray(s.corr))
  np.testing.assert_array_equal(back.diag, np.asarray(s.diag))
  with np.load(artifact.layer_path(tmp_path, 0)) as z:
    arrays = {k: z[k] for k in z.files if not k.startswith("gram/")}
  arrays["gram/q"] = grams
  np.savez(artifact.layer_path(tmp_path, 1), **arrays)
  np.testing.assert_array_equal(
      np.asarray(gram_store.to_device(artifact.load_grams(tmp_path, 1)["q"])),
      grams)


def _f_lam(grams, W0, W, lam):
  """numpy `sum_i lam_i f_i` on the damped exact Grams."""
  damped = [g + DEFAULT.damping * np.mean(np.diag(g)) * np.eye(len(g))
            for g in np.asarray(grams, np.float64)]
  return sum(w * rel_err(g, W0, W) for w, g in zip(lam, damped, strict=True))


def test_refit_on_stored_grams_matches_refit_on_exact_grams(grams):
  """The refit reads the stored Grams: each interior model's objective,
  on the exact Grams, is below the projected mix's and within 1e-3 of the
  refit on the exact Grams."""
  rng = np.random.default_rng(4)
  W0 = rng.standard_normal((40, 24)).astype(np.float32)
  pattern = Unstructured(0.5)
  par = mosp_pareto(grams, W0, pattern=pattern, cfg=PAPER)[0]
  prefs = np.array([[1 / 3, 1 / 3, 1 / 3], [0.6, 0.3, 0.1]], np.float32)
  cfg = dataclasses.replace(DEFAULT, pref_refit_iters=10)
  stored = gram_store.decode(gram_store.encode(grams))
  mix, _ = mosp_materialize(par, prefs, pattern=pattern, cfg=PAPER)
  exact, _ = mosp_materialize(par, prefs, pattern=pattern, cfg=cfg,
                              grams=grams, W0=W0)
  fit, _ = mosp_materialize(par, prefs, pattern=pattern, cfg=cfg,
                            grams=stored, W0=W0)
  for p, lam in enumerate(prefs):
    f_mix, f_exact, f_fit = (_f_lam(grams, W0, np.asarray(w[p]), lam)
                             for w in (mix, exact, fit))
    assert f_fit < f_mix
    assert abs(f_fit - f_exact) <= 1e-3 * f_exact
