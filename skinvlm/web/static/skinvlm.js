// What skinvlm's pages share: every string from the workspace goes in through textContent, never as HTML, and
// every change is sent with the page's CSRF token. Paths are as each page gives them (the review page's are
// relative, so it works alone and as the ui's tab).
"use strict";
const csrf = document.querySelector('meta[name="csrf"]').content;
const $ = (id) => document.getElementById(id);

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

async function requestError(response) {
  return new Error((await response.json().catch(() => ({}))).error || response.statusText);
}

async function get(path) {
  const response = await fetch(path, { credentials: "same-origin" });
  if (!response.ok) throw await requestError(response);
  return (response.headers.get("content-type") || "").startsWith("application/json") ? response.json() : response.text();
}

async function post(path, body) {
  const response = await fetch(path, { method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf }, body: JSON.stringify(body || {}) });
  if (!response.ok) throw await requestError(response);
  return response.json();
}

// Data a page was served with, in a <script type="application/json"> element (data, not code: the CSP allows it).
function bootData() {
  return JSON.parse($("boot").textContent);
}
