// Talks to nginx with the token meter module through the official openai
// npm client, as an application would, and prints what it got as one
// JSON line for t/030-openai-client.t to compare.
//
//     node t/openai/client.mjs http://127.0.0.1:1984/v1 sk-...
//
// Exits with status 1, and the reason on stderr, when a call fails in a
// way the test does not expect.

import OpenAI from 'openai';

const [baseURL, apiKey] = process.argv.slice(2);

if (!baseURL || !apiKey) {
    console.error('usage: node client.mjs <base URL> <API key>');
    process.exit(2);
}

// no retries: a test must see the first answer, not the third
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 20000 });

const messages = [{ role: 'user', content: 'Hello' }];

async function chat() {
    const answer = await client.chat.completions.create({
        model: 'kimi-k2.5',
        messages,
    });

    return {
        content: answer.choices[0].message.content,
        finish_reason: answer.choices[0].finish_reason,
        usage: answer.usage,
    };
}

// a stream as most applications ask for it, without usage
async function chatStream(options) {
    const stream = await client.chat.completions.create({
        model: 'kimi-k2.5',
        messages,
        stream: true,
        ...options,
    });

    let content = '';
    let chunks = 0;
    let usageChunks = 0;
    let usage = null;

    for await (const chunk of stream) {
        chunks++;

        if (chunk.choices.length === 0) {
            usageChunks++;
        }

        if (chunk.usage) {
            usage = chunk.usage;
        }

        content += chunk.choices[0]?.delta?.content ?? '';
    }

    return { content, chunks, usage_chunks: usageChunks, usage };
}

async function embeddings() {
    // the client asks for base64 unless told otherwise; the mock only
    // answers with lists of numbers
    const answer = await client.embeddings.create({
        model: 'kimi-k2.5',
        input: ['first text', 'second text'],
        encoding_format: 'float',
    });

    return {
        count: answer.data.length,
        dimensions: answer.data[0].embedding.length,
        usage: answer.usage,
    };
}

async function responses() {
    const answer = await client.responses.create({
        model: 'kimi-k2.5',
        input: 'Hello',
    });

    return {
        text: answer.output_text,
        status: answer.status,
        usage: {
            input_tokens: answer.usage.input_tokens,
            output_tokens: answer.usage.output_tokens,
        },
    };
}

async function responsesStream() {
    const stream = await client.responses.create({
        model: 'kimi-k2.5',
        input: 'Hello',
        stream: true,
    });

    let text = '';
    let events = 0;
    let usage = null;

    for await (const event of stream) {
        events++;

        if (event.type === 'response.output_text.delta') {
            text += event.delta;
        }

        if (event.type === 'response.completed') {
            usage = {
                input_tokens: event.response.usage.input_tokens,
                output_tokens: event.response.usage.output_tokens,
            };
        }
    }

    return { text, events, usage };
}

// an error answer must come out as the client's own error classes
async function failure(call) {
    try {
        await call();

    } catch (err) {
        if (err instanceof OpenAI.APIError) {
            return {
                class: err.constructor.name,
                status: err.status,
                type: err.type,
                code: err.code,
            };
        }

        throw err;
    }

    throw new Error('the call did not fail');
}

const result = {};

try {
    result.chat = await chat();
    result.chat_stream = await chatStream({});
    result.chat_stream_usage = await chatStream({
        stream_options: { include_usage: true },
    });
    result.embeddings = await embeddings();
    result.responses = await responses();
    result.responses_stream = await responsesStream();

    result.unknown_model = await failure(() =>
        client.chat.completions.create({ model: 'gpt-none', messages }));

    const stranger = new OpenAI({
        baseURL,
        apiKey: 'sk-wrong-key-0000000000',
        maxRetries: 0,
    });

    result.wrong_key = await failure(() =>
        stranger.chat.completions.create({ model: 'kimi-k2.5', messages }));

} catch (err) {
    console.error(`client.mjs: ${err.stack ?? err}`);
    process.exit(1);
}

console.log(JSON.stringify(result));
