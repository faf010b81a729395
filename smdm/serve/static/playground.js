// The smdm playground: streams /v1/completions with smdm_show_steps and draws every denoising frame.
// Masked positions are grey boxes, the tokens revealed by the latest step are highlighted; an ARM's tokens simply
// appear in order. Plain JS, no build step, no network access beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { family: null, frames: [], running: false };
window.smdmPlayground = state; // read by the browser test: every frame as drawn

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  const body = await response.json();
  if (!response.ok) {
    $("model").textContent = body.error ? body.error.message : "cannot list models";
    return;
  }
  const model = body.data[0];
  state.model = model.id;
  state.family = model.family;
  document.body.classList.toggle("arm", model.family === "arm");
  $("model").textContent = `${model.id} · ${model.family.toUpperCase()} · context ${model.context_length}`;
  const caches = model.family === "arm" ? ["kv", "none"] : ["none", "prefix", "dual"];
  for (const cache of caches) {
    const option = document.createElement("option");
    option.value = option.textContent = cache;
    $("cache").appendChild(option);
  }
}

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

function requestBody() {
  const body = {
    model: state.model, prompt: $("prompt").value, stream: true, smdm_show_steps: true,
    max_tokens: number("max_tokens"), temperature: number("temperature"), top_p: number("top_p"),
  };
  if ($("cache").value) body.cache = $("cache").value;
  if (state.family === "mdm") {
    for (const id of ["steps", "block_length", "cfg_scale", "threshold"]) {
      if (number(id) !== undefined) body[id] = number(id);
    }
    body.remasking = $("remasking").value;
    if ($("suffix").value) body.suffix = $("suffix").value;
  }
  return body;
}

function draw(frame, previous) {
  const tokens = $("tokens");
  tokens.textContent = "";
  frame.tokens.forEach((text, i) => {
    const span = document.createElement("span");
    span.className = "tok";
    if (text === null) {
      span.classList.add("mask");
      span.textContent = "▒";
    } else {
      const wasHidden = !previous || i >= previous.tokens.length || previous.tokens[i] === null;
      if (wasHidden) span.classList.add("new");
      if (frame.eos !== null && i >= frame.eos) span.classList.add("eos");
      span.textContent = text === "" ? "⏎" : text;
      if (text === "") span.title = "end of text";
    }
    tokens.appendChild(span);
  });
  const hidden = frame.tokens.filter((t) => t === null).length;
  $("step").textContent = frame.step;
  $("passes").textContent = frame.forward_passes;
  $("hidden").textContent = hidden;
  state.frames.push({ step: frame.step, hidden, shown: tokens.querySelectorAll(".mask").length,
                      highlighted: tokens.querySelectorAll(".new").length });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function generate(event) {
  event.preventDefault();
  if (state.running) return;
  state.running = true;
  state.frames = [];
  $("go").disabled = true;
  $("error").textContent = "";
  $("tokens").textContent = "";
  $("given-prefix").textContent = $("prompt").value;
  $("given-suffix").textContent = state.family === "mdm" ? $("suffix").value : "";
  $("state").textContent = "generating…";
  const replay = number("replay") || 0;
  let previous = null, finish = null;
  try {
    const response = await fetch("/v1/completions", { method: "POST", headers: headers(),
                                                      body: JSON.stringify(requestBody()) });
    if (!response.ok) {
      const body = await response.json();
      throw new Error(body.error ? body.error.message : response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices[0];
        if (!choice) continue;
        if (choice.smdm && choice.smdm.tokens) {
          draw(choice.smdm, previous);
          previous = choice.smdm;
          if (replay) await sleep(replay);
        }
        if (choice.finish_reason) {
          finish = choice.finish_reason;
          $("passes").textContent = choice.smdm.forward_passes;
        }
      }
    }
    $("state").textContent = `done (${finish})`;
  } catch (error) {
    $("error").textContent = error.message;
    $("state").textContent = "failed";
  } finally {
    state.running = false;
    state.done = true;
    $("go").disabled = false;
  }
}

$("form").addEventListener("submit", generate);
$("api_key").addEventListener("change", () => { $("cache").length = 1; loadModel(); });
loadModel();
