// The page at /: plain JavaScript over the same JSON API the service documents at /docs.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = localStorage.getItem("occface-api-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("occface-api-key", keyInput.value));

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function call(method, path, form) {
  const headers = {};
  if (keyInput.value) headers["Authorization"] = "Bearer " + keyInput.value;
  const response = await fetch(path, { method, headers, body: form });
  const body = await response.json().catch(() => ({ error: { message: response.statusText } }));
  if (!response.ok) throw new Error(`${response.status}: ${(body.error && body.error.message) || response.statusText}`);
  return body;
}

function file(id) {
  const input = $(id);
  if (!input.files.length) throw new Error(`choose a photo for "${input.parentElement.firstChild.textContent.trim()}"`);
  return input.files[0];
}

function figure(face, caption) {
  const item = document.createElement("figure");
  const image = document.createElement("img");
  image.src = "data:image/png;base64," + face.overlay_png;
  image.alt = caption;
  const text = document.createElement("figcaption");
  const seen = face.visibility;
  text.textContent = `${caption}: ${face.occlusion}, ${(100 * seen.hidden_share).toFixed(0)}% hidden` +
    (face.landmark_source ? `, ${face.landmark_source} points (${face.points_used})` : "");
  item.append(image, text);
  return item;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    td.textContent = cell;
    tr.append(td);
  }
  return tr;
}

for (const drop of document.querySelectorAll(".drop")) {
  const input = drop.querySelector("input");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    input.files = event.dataTransfer.files;
  });
}

$("verify-button").addEventListener("click", async () => {
  showError("");
  try {
    const form = new FormData();
    form.append("first", file("first"));
    form.append("second", file("second"));
    form.append("overlay", "true");
    const result = await call("POST", "/v1/verify", form);
    const faces = $("verify-faces");
    faces.replaceChildren(figure(result.faces[0], "first"), figure(result.faces[1], "second"));
    const decision = result.decision;
    $("decision").textContent = decision
      ? (decision.same ? "Same person" : "Different people") + ` (${decision.source} ${result.scores[decision.source].toFixed(3)}, threshold ${decision.threshold.toFixed(3)})`
      : "No calibrated threshold: scores only";
    $("decision").className = decision && decision.same ? "same" : "different";
    $("stratum").textContent = result.stratum.why;
    const body = $("scores").querySelector("tbody");
    body.replaceChildren(...Object.entries(result.scores).map(([source, score]) => row([
      source, score.toFixed(3),
      source in result.decisions ? "" + (result.decisions[source] ? "above" : "below") : "—",
      source in result.decisions ? (result.decisions[source] ? "same" : "different") : "—",
    ])));
    $("verify-result").hidden = false;
  } catch (error) {
    showError(error.message);
  }
});

$("search-button").addEventListener("click", async () => {
  showError("");
  try {
    const form = new FormData();
    form.append("image", file("search-image"));
    form.append("top", $("search-top").value || "5");
    form.append("overlay", "true");
    const result = await call("POST", "/v1/search", form);
    $("search-face").replaceChildren(figure(result.face, "probe"));
    $("search-decision").textContent = result.decision === "unknown"
      ? "Unknown: no enrolled subject above the threshold"
      : `Best match: ${result.decision}`;
    const body = $("candidates").querySelector("tbody");
    body.replaceChildren(...result.candidates.map((c, i) => row([
      i + 1, c.subject, c.scores.fused === undefined ? "—" : c.scores.fused.toFixed(3),
      c.scores.embedding.toFixed(3), c.scores.qaconv.toFixed(3),
    ])));
    $("search-result").hidden = false;
  } catch (error) {
    showError(error.message);
  }
});

$("enroll-button").addEventListener("click", async () => {
  showError("");
  try {
    const subject = $("enroll-subject").value.trim();
    if (!subject) throw new Error("enter a subject id");
    const form = new FormData();
    form.append("image", file("enroll-image"));
    const result = await call("POST", `/v1/subjects/${encodeURIComponent(subject)}/faces`, form);
    const box = $("enroll-result");
    box.textContent = result.duplicate ? `${subject}: this photo was enrolled before` :
      `${subject}: enrolled (${result.occlusion}, face ${result.face_id.slice(0, 8)})`;
    box.hidden = false;
  } catch (error) {
    showError(error.message);
  }
});
