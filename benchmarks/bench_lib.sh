# Shared by the bench lane scripts (photo_tuning.sh, glyph_check.sh); sourced from the repository root, not run.
link_runs() {  # from to pattern: link the finished runs from/runs/<pattern> into the bench folder `to` (relative
  # links), where `dfm bench quality --out to` finds them trained and only scores them (with its own sampler settings
  # and sample count): a trained model scored again without retraining it
  local run found=0
  mkdir -p "$2/runs"
  for run in "$1"/runs/$3; do
    [ -e "$run" ] || continue
    ln -sfn "$(realpath --relative-to="$2/runs" "$run")" "$2/runs/$(basename "$run")"
    found=1
  done
  [ "$found" = 1 ] || { echo "no finished run $1/runs/$3 to link: train it first" >&2; return 1; }
}
